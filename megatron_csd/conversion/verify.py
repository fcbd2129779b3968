"""Compare a converted Megatron model with the HF original on the same token ids.

`megatron_logits` runs a model built by `build_gpt_model` through Megatron's own forward
schedule (`get_forward_backward_func`, forward only, one microbatch), so pipeline stages are
exercised as in training, and returns the full-vocabulary logits on the last pipeline stage
(TP shards all-gathered over the tensor-parallel group; other ranks get None).
`compare_logits` reports the max |difference| over the real vocabulary and the mean per-token
KL(p_hf || p_megatron), both in float64.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class LogitComparison(NamedTuple):
    max_abs_diff: float
    mean_kl: float
    max_abs_logit: float


def megatron_logits(model, tokens: torch.Tensor, *, gather_tp: bool = True) -> Optional[torch.Tensor]:
    """Logits [b, s, V_padded] (or [b, s, V_padded/TP] without gather) on the last PP stage."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, seq)

    def loss_func(output, non_loss_data=False):
        return output.detach().clone()

    def forward_step(data_iterator, chunk):
        return chunk(next(data_iterator), positions, None), loss_func

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
            collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_vocab_parallel_logits(outputs[0]) if gather_tp else outputs[0]


def gather_vocab_parallel_logits(logits: torch.Tensor) -> torch.Tensor:
    """All-gather `[..., V/TP]` shards over the tensor-parallel group into `[..., V]`."""
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return logits
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def compare_logits(hf_logits: torch.Tensor, mg_logits: torch.Tensor, vocab_size: int) -> LogitComparison:
    """Max |diff| and mean KL(p_hf || p_mg) over the first `vocab_size` columns (float64)."""
    ref = hf_logits[..., :vocab_size].double().cpu()
    got = mg_logits[..., :vocab_size].double().cpu()
    log_p, log_q = F.log_softmax(ref, dim=-1), F.log_softmax(got, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return LogitComparison(float((ref - got).abs().max()), float(kl), float(ref.abs().max()))


def check_conversion(hf_dir, megatron_dir, *, tp: int = 1, pp: int = 1, batch: int = 2,
                     seq_len: int = 32, seed: int = 0, dtype: str = "float32",
                     verify: bool = True) -> Optional[LogitComparison]:
    """Run both models on the same random token ids; the comparison on the reporting rank.

    `megatron_dir` is a model checkpoint, one `iter_*` folder of a training run, or a training
    save directory (its `latest` iteration), as for the exporter.

    Call on every rank of an initialised process group (torchrun, or one process). Builds
    parallel_state at TP x PP (data parallel fills the rest), enables the CPU layer when CUDA is
    absent, and tears parallel_state down afterwards. Returns None on non-reporting ranks.
    """
    from megatron.core import parallel_state

    from megatron_csd.conversion.hf_to_megatron import DTYPES
    from megatron_csd.models.builder import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, load_model_config, resolve_model_checkpoint
    from megatron_csd.parallel.cpu_mode import enable_cpu_mode, seed_model_parallel_rng

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    megatron_dir = resolve_model_checkpoint(megatron_dir)  # a trainer save dir -> its latest
    cfg = load_model_config(megatron_dir)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    cuda = torch.cuda.is_available()
    if not cuda:
        enable_cpu_mode()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             pipeline_model_parallel_size=pp)
    try:
        seed_model_parallel_rng(seed)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        model = build_gpt_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                                post_process=parallel_state.is_pipeline_last_stage(),
                                params_dtype=DTYPES[dtype], perform_initialization=False)
        load_model(model, megatron_dir, verify=verify)  # verify: the manifest check
        model.eval()
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=generator).to(device)
        logits = megatron_logits(model, tokens)
        reporting = (parallel_state.is_pipeline_last_stage()
                     and parallel_state.get_tensor_model_parallel_rank() == 0
                     and parallel_state.get_data_parallel_rank() == 0)
        if not reporting:
            return None
        from transformers import AutoModelForCausalLM

        import transformers

        # transformers < 4.56 names the argument torch_dtype (and ignores an unknown `dtype`).
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, **{dtype_kwarg: DTYPES[dtype]})
        hf_model = hf_model.to(device).eval()
        with torch.no_grad():
            hf_logits = hf_model(tokens).logits
        return compare_logits(hf_logits, logits, cfg.vocab_size)
    finally:
        parallel_state.destroy_model_parallel()
