"""The training loop: distillation (teacher + student) or plain SFT, over TP x PP x DP.

    result = run_training(config)      # every rank calls it (torchrun, or tests' spawn helper)

Per iteration: the lr schedule steps, Megatron's forward-backward schedule runs
``global_batch / (micro_batch * DP)`` microbatches on each DP rank (gradient accumulation),
``finalize_model_grads`` reduces gradients over DP and scales them by the global response-token
count, the Megatron optimizer clips and steps. Losses are per-token means over the global
batch (see objective.py). Validation runs the forward-only schedule over the held-out split.
Metrics go to the console and ``OUTPUT_DIR/metrics.jsonl``; checkpoints to ``checkpoint.save``.
``teacher_forward_s`` is the teacher forward time of the logging rank's pipeline stage (global
rank 0, the first stage; the whole teacher when PP = 1), summed over the step's microbatches,
measured without extra GPU synchronisation (see stage.py). Before every training step and
every evaluation pass the teacher's ``set_is_first_microbatch`` is called (FP8 weight caching).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_csd.training import console
from megatron_csd.training.config import TrainConfig, check_world_size
from megatron_csd.training.guards import DivergenceMonitor, check_finite_metrics, check_finite_parameters
from megatron_csd.training.run_guard import guard_run, run_and_release


@dataclass
class TrainResult:
    """What a run did (identical on every rank)."""

    train_losses: list = field(default_factory=list)       # per iteration, global per-token mean
    validation: list = field(default_factory=list)         # [{"iteration", "loss", "ce", "kd"?}]
    last_iteration: int = 0
    checkpoint: Optional[str] = None
    output_dir: str = ""


def _resolve_precision(config: TrainConfig, device: str) -> str:
    precision = config.precision
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if device == "cpu" and precision != "fp32":
        raise ValueError(f"precision {precision!r} needs CUDA: Megatron's mixed-precision "
                         "optimizer is CUDA-only. Use --precision fp32 on CPU")
    return precision


def _configure_schedule(transformer_config, ddp_model, optimizer) -> None:
    """Runtime hooks the schedules read from the student's TransformerConfig."""
    from megatron.core.distributed import finalize_model_grads

    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.grad_scale_func = optimizer.scale_loss
    transformer_config.no_sync_func = ddp_model.no_sync


class Trainer:
    def __init__(self, config: TrainConfig):
        from megatron_csd.parallel.initialize import initialize_parallel, resolve_device
        from megatron_csd.training.config_io import save_resolved_config
        from megatron_csd.training.data_setup import load_run_data
        from megatron_csd.training.generation_eval import GenerationEvalHook
        from megatron_csd.training.metrics import MetricsWriter
        from megatron_csd.training.model_setup import build_models, params_dtype_for, plan_models
        from megatron_csd.training.objective import ObjectiveSpec
        from megatron_csd.training.optim import build_optimizer, build_scheduler, wrap_ddp
        from megatron_csd.training.stage import DistillationStage, fused_head_supported

        self.config = config
        self.device_kind = resolve_device(config.device)
        precision = _resolve_precision(config, self.device_kind)
        if config.fp8_teacher is not None and self.device_kind != "cuda":
            raise ValueError("fp8_teacher needs a CUDA GPU with transformer-engine; drop "
                             "--fp8-teacher on CPU")
        world_size = int(os.environ.get("WORLD_SIZE", "1")) if not dist.is_initialized() else dist.get_world_size()
        self.dp_size = check_world_size(config, world_size)
        par = config.parallel
        self.ctx = initialize_parallel(
            device=self.device_kind, tensor_model_parallel_size=par.tensor_model_parallel_size,
            pipeline_model_parallel_size=par.pipeline_model_parallel_size, seed=config.training.seed)
        if self.device_kind == "cpu":
            from megatron_csd.parallel.cpu_optimizer import enable_cpu_grad_clipping

            enable_cpu_grad_clipping()
        ctx = self.ctx
        self.start = guard_run(config, ctx)  # lock; resume, refuse or overwrite (run_guard.py)
        self.config = config = self.start.config
        if self.start.finished is not None:
            return  # run() reports the finished run; there is nothing to build
        self.writer = MetricsWriter(config.logging.output_dir, enabled=ctx.is_logging_rank,
                                    tensorboard=config.logging.tensorboard,
                                    quiet=config.logging.quiet,
                                    resume=self.start.resumes_latest)
        if ctx.is_logging_rank and self.start.config_file is not None:  # never over a differing one
            save_resolved_config(config, config.logging.output_dir, name=self.start.config_file)
        self.data = load_run_data(config, ctx.rank)
        self.plan = plan_models(config, self.data.tokenizer)
        self.params_dtype = params_dtype_for(precision)
        student, teacher = build_models(config, self.plan, pre_process=ctx.is_first_stage,
                                        post_process=ctx.is_last_stage, params_dtype=self.params_dtype)
        self.student = student
        self.stage = DistillationStage(
            student, teacher, student_hidden=self.plan.student.hidden_size,
            teacher_hidden=self.plan.teacher.hidden_size if teacher is not None else 0,
            post_process=ctx.is_last_stage, timed=True,
            fused_output_loss=config.loss.fused_output_loss and fused_head_supported(student, teacher))
        transformer_config = student.config
        transformer_config.calculate_per_token_loss = True  # read by DDP and the schedules
        use_dist_opt = config.optimizer.use_distributed_optimizer
        if use_dist_opt is None:
            use_dist_opt = self.device_kind == "cuda"
        if use_dist_opt and self.device_kind == "cpu":
            from megatron_csd.parallel.cpu_optimizer import enable_cpu_distributed_optimizer

            enable_cpu_distributed_optimizer()
        self.ddp = wrap_ddp(self.stage, transformer_config, use_distributed_optimizer=use_dist_opt)
        self.optimizer = build_optimizer(self.ddp, config.optimizer, params_dtype=self.params_dtype,
                                         use_distributed_optimizer=use_dist_opt)
        self.scheduler = build_scheduler(self.optimizer, config)
        _configure_schedule(transformer_config, self.ddp, self.optimizer)
        self.spec = ObjectiveSpec(
            distill=config.distill,
            loss_config=config.loss.loss_config() if config.distill else None,
            kd_ratio=config.loss.kd_ratio, vocab_size=self.plan.vocab_size,
            padded_vocab_size=self.plan.student.padded_vocab_size,
            tp_group=ctx.tp_group, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
        sequences_per_round = config.training.micro_batch_size * self.dp_size
        self.num_microbatches = config.training.global_batch_size // sequences_per_round
        self.save_dir = config.checkpoint.save or os.path.join(config.logging.output_dir, "checkpoints")
        self._setup_train_iterator()
        self.eval_generate = GenerationEvalHook(self)  # --eval-generate-*: sampled answers, ROUGE-L
        self.iteration = 0
        # (iteration, directory) of a checkpoint in save_dir that holds the current state:
        # written by this run, or the one just loaded when it is save_dir's latest.
        self.checkpoint_on_disk: Optional[tuple] = None
        self.divergence = DivergenceMonitor(config.training.divergence_warning_factor, enabled=ctx.is_logging_rank)
        if config.checkpoint.load is not None:
            self._resume(config.checkpoint.load)

    # ----------------------------------------------------------------- data
    def _setup_train_iterator(self):
        from megatron_csd.data import BatchIterator, ResumableSampler
        from megatron_csd.training.data_setup import to_device
        from megatron_csd.training.packing_setup import training_rows

        rows = training_rows(self.config, self.data.train, self.writer)  # packed bins or samples
        sampler = ResumableSampler(len(rows), seed=self.config.training.seed,
                                   dp_rank=self.ctx.dp_rank, dp_size=self.dp_size)
        self.train_batches = BatchIterator(rows, sampler, self.config.training.micro_batch_size)
        self.train_iterator = to_device(self.train_batches, self.ctx.device)
        from megatron_csd.training.on_policy import build_on_policy

        self.on_policy = build_on_policy(self)  # None unless an on_policy option is set
        if self.on_policy is not None:
            self.train_batches = self.on_policy  # draws through the same sampler; adds its state

    def _resume(self, load: str):
        from megatron_csd.training.checkpointing import load_checkpoint, resolve_checkpoint_dir
        from megatron_csd.training.metrics_file import trim_metrics_after_resume
        from megatron_csd.training.optim import configured_lr_kept

        directory = resolve_checkpoint_dir(load)
        with configured_lr_kept(self.optimizer):  # --lr of this launch, not the checkpoint's
            state = load_checkpoint(directory, student=self.student, model_config=self.plan.student,
                                    optimizer=self.optimizer, scheduler=self.scheduler, ctx=self.ctx)
        self.train_batches.load_state_dict(state.sampler)
        self.iteration = state.iteration
        if self.start.resumes_latest:  # a relaunch: the loaded checkpoint is save_dir's latest
            trim_metrics_after_resume(self.writer, self.iteration)  # one record per iteration
            self.checkpoint_on_disk = (self.iteration, directory)
        self.writer.print(f"[megatron_csd] resumed from {directory} at iteration {self.iteration}")

    # ----------------------------------------------------------------- steps
    def _forward_backward(self, data_iterator, num_microbatches: int, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_csd.training.objective import make_forward_step
        from megatron_csd.training.stage import widen_p2p_shapes

        kwargs = {}
        if self.ctx.pp_size > 1 and self.stage.teacher is not None:
            kwargs["adjust_tensor_shapes_fn"] = widen_p2p_shapes(self.stage.teacher_hidden)
        return get_forward_backward_func()(
            forward_step_func=make_forward_step(self.spec, evaluating=forward_only),
            data_iterator=data_iterator,
            model=[self.ddp], num_microbatches=num_microbatches,
            seq_length=self.config.training.seq_length,
            micro_batch_size=self.config.training.micro_batch_size,
            forward_only=forward_only, **kwargs)

    def _reduce(self, outputs, *, evaluating: bool) -> dict:
        from megatron_csd.training.metrics import reduce_loss_stats
        from megatron_csd.training.objective import metric_names

        contributes = self.ctx.is_last_stage and self.ctx.tp_rank == 0
        return reduce_loss_stats(outputs, metric_names(self.spec, evaluating), contributes=contributes,
                                 device=self.ctx.device)

    def train_step(self) -> dict:
        self.ddp.train()
        self.scheduler.step(increment=1)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.stage.reset_teacher_time()
        self.stage.start_teacher_pass()
        start = time.perf_counter()
        batches, count = ((self.train_iterator, self.num_microbatches) if self.on_policy is None
                          else self.on_policy.step_iterator(self.iteration + 1))
        outputs = self._forward_backward(batches, count, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        stats = self._reduce(outputs, evaluating=False)
        self.iteration += 1
        tokens = self.config.training.global_batch_size * self.config.training.seq_length
        record = {"iteration": self.iteration, "loss": stats["loss"], "ce": stats["ce"]}
        if "kd" in stats:
            record["kd"] = stats["kd"]
        record.update({
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "update_skipped": not update_ok,
            "response_tokens": int(stats["tokens"]),
            "step_time_s": elapsed,
            "tokens_per_s": tokens / elapsed,
        })
        record.update(self.on_policy.stats if self.on_policy is not None else {})
        if self.stage.teacher is not None:
            # The teacher layers of THIS rank's pipeline stage only (the whole teacher when
            # PP = 1); the logging rank (global rank 0) is on the first stage.
            record["teacher_forward_s"] = self.stage.teacher_forward_seconds()
        check_finite_metrics(record, grad_norm_measured=grad_norm is not None, device=self.ctx.device)
        return record

    def evaluate(self) -> dict:
        from megatron_csd.training.data_setup import eval_iterator

        if self.data.valid is None:
            return {}
        self.ddp.eval()
        iterator, count = eval_iterator(self.data.valid, self.config, dp_rank=self.ctx.dp_rank,
                                        dp_size=self.dp_size, device=self.ctx.device)
        self.stage.start_teacher_pass()
        with torch.no_grad():
            outputs = self._forward_backward(iterator, count, forward_only=True)
        self.ddp.train()
        stats = self._reduce(outputs, evaluating=True)
        record = {"iteration": self.iteration, "split": "valid", **stats}
        record["response_tokens"] = int(record.pop("tokens"))
        return record

    def save(self) -> str:
        from megatron_csd.training.checkpointing import save_checkpoint

        check_finite_parameters(self.student, self.iteration, device=self.ctx.device)
        directory = save_checkpoint(self.save_dir, self.iteration, student=self.student,
                                    model_config=self.plan.student, optimizer=self.optimizer,
                                    scheduler=self.scheduler,
                                    sampler_state=self.train_batches.state_dict(), ctx=self.ctx,
                                    tokenizer_path=self.config.data.tokenizer)
        self.checkpoint_on_disk = (self.iteration, directory)
        return directory

    # ----------------------------------------------------------------- loop
    def _validate(self, result: TrainResult):
        record = self.evaluate()
        if record:
            check_finite_metrics(record, device=self.ctx.device)
            result.validation.append(record)
            self.writer.log(record, console=console.valid_line(record, self.config.loss.objective))
            if self.on_policy is not None:  # DistiLLM's adaptive schedule watches validation
                self.on_policy.observe_validation(record)

    def run(self) -> TrainResult:
        if self.start.finished is not None:
            return self.start.finished_result()
        config = self.config
        result = TrainResult(output_dir=config.logging.output_dir)
        train_iters = config.training.train_iters
        eval_interval = config.training.eval_interval
        if config.training.eval_at_start and self.iteration == 0:
            self._validate(result)
        saved_this_run = None
        while self.iteration < train_iters:
            record = self.train_step()
            result.train_losses.append(record["loss"])
            self.divergence.observe(self.iteration, record["loss"])  # a warning, never a stop
            if self.iteration % config.logging.log_interval == 0 or self.iteration == train_iters:
                self.writer.log({"split": "train", **record}, console=console.train_line(record, train_iters))
            if eval_interval and self.iteration % eval_interval == 0 and self.iteration != train_iters:
                self._validate(result)
            self.eval_generate.after_step(self.iteration)
            interval = config.checkpoint.save_interval
            if interval and self.iteration % interval == 0:
                saved_this_run = self.save()
        self._validate(result)
        for line in console.summary_lines(result.validation, mode=config.mode, loss=config.loss):
            self.writer.print(line)
        on_disk = self.checkpoint_on_disk
        current = on_disk[1] if on_disk is not None and on_disk[0] == self.iteration else None
        if config.checkpoint.save_final and current is None:
            current = saved_this_run = self.save()
        # A relaunch of a finished run (--load of its own latest) re-saves nothing.
        last_saved = current or saved_this_run
        result.checkpoint = last_saved
        result.last_iteration = self.iteration
        if last_saved is not None:
            self.writer.print(f"[megatron_csd] checkpoint: {last_saved}")
        self.writer.print(f"[megatron_csd] metrics:    {self.writer.path}")
        self.writer.close()
        self.start.release()
        return result


def run_training(config: TrainConfig) -> TrainResult:
    """Build everything for this rank and train; every rank of the world must call it."""
    return run_and_release(Trainer(config))  # the run lock is released also on failure
