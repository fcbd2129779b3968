"""Megatron DDP, optimizer and learning-rate schedule for the student.

- DDP: Megatron's ``DistributedDataParallel`` over the student stage (the frozen teacher is not
  in its module tree). ``calculate_per_token_loss`` is on, so DDP sums gradients over DP
  without pre-scaling and ``finalize_model_grads`` divides by the global token count.
- Optimizer: ``get_megatron_optimizer`` with Adam and decoupled weight decay (AdamW); no
  decay on biases and norms (Megatron's default grouping); global grad-norm clipping;
  distributed optimizer (state sharded over DP) and bf16 / fp16 mixed precision on CUDA.
- Schedule: Megatron's ``OptimizerParamScheduler``; it is stepped once BEFORE each update, so
  update ``i`` (1-based) uses the lr of step ``i``: warmup reaches ``lr`` at step
  ``lr_warmup_iters`` and the decay reaches ``min_lr`` at ``lr_decay_iters``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megatron_csd.training.config import OptimizerConfig, TrainConfig


def wrap_ddp(stage, transformer_config, *, use_distributed_optimizer: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=stage)


def build_optimizer(ddp_model, opt: OptimizerConfig, *, params_dtype: torch.dtype,
                    use_distributed_optimizer: bool):
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    megatron_config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return get_megatron_optimizer(megatron_config, [ddp_model])


def build_scheduler(optimizer, config: TrainConfig):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = config.optimizer
    train_iters = max(config.training.train_iters, 1)
    decay_iters = opt.lr_decay_iters if opt.lr_decay_iters is not None else train_iters
    if opt.lr_warmup_iters >= decay_iters and opt.lr_decay_style != "constant":
        raise ValueError(f"optimizer.lr_warmup_iters ({opt.lr_warmup_iters}) must be smaller than "
                         f"the decay length ({decay_iters} = lr_decay_iters or train_iters)")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=decay_iters,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        # On --load only the step count comes from the checkpoint; lr, warmup and decay
        # follow the current config (so a resumed run may extend or change its schedule).
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


@contextmanager
def configured_lr_kept(optimizer):
    """Keep the configured per-group ``max_lr`` / ``min_lr`` across ``optimizer.load_state_dict``.

    Megatron's optimizer param groups carry their own ``max_lr`` / ``min_lr``, which the
    scheduler prefers over its own, and loading a checkpoint restores the saved ones: a run
    resumed with a lower ``--lr`` (the usual fix for a diverged run) would silently keep the
    old learning rate. The schedule follows the current config on ``--load`` (see
    ``build_scheduler``), so the configured values are put back after loading.
    """
    configured = [{key: group[key] for key in ("max_lr", "min_lr") if key in group}
                  for group in optimizer.param_groups]
    yield
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
