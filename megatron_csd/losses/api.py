"""`distillation_loss`: the one entry point, dispatching on `LossConfig.objective`."""
from __future__ import annotations

from typing import Optional

import torch

from .config import LossConfig
from .csd import CSDSpec, csd_loss
from .divergences import KL_FAMILY, DivergenceSpec, divergence_loss
from .logit_mse import logit_mse_loss
from .vocab_shard import describe_shard

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, tensor in (("student_logits", student), ("teacher_logits", teacher)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be floating-point logits (float32, bfloat16, float16 or float64), got {tensor.dtype}")
        if tensor.dim() < 1 or tensor.shape[-1] == 0:
            raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(tensor.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} differ in shape; "
            "both must be [..., V_local] over the same (padded) vocabulary shard. If the models' vocabulary "
            "sizes differ, pad both to a common size and pass the real size as vocab_size")
    if student.dtype != teacher.dtype:
        raise ValueError(f"student_logits is {student.dtype} but teacher_logits is {teacher.dtype}; "
                         "cast the teacher logits to the student's dtype")
    if student.device != teacher.device:
        raise ValueError(f"student_logits on {student.device} but teacher_logits on {teacher.device}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, config: LossConfig, *,
                      tp_group=None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token distillation loss of (vocab-parallel) student and teacher logits.

    student_logits, teacher_logits: `[..., V_local]`, float32 / bfloat16 / float16, same shape and
        dtype. With `tp_group`, rank r of the group holds vocabulary columns [r*V_local, (r+1)*V_local).
    config: a `LossConfig` (objective and its knobs).
    vocab_size: the real vocabulary size; columns at or past it (Megatron's padding) are ignored.
        Defaults to all columns. Columns that are -inf in either input are ignored likewise; a
        token with no usable column gets loss 0 and gradient 0. NaN or +inf in any real column of
        either input is invalid: that token's loss is NaN, on every rank of `tp_group`, and so is
        its gradient row (whatever the upstream gradient); other tokens are unaffected.

    Returns fp32 loss (fp64 for fp64 inputs) with the logits' leading shape, unreduced and unmasked (the caller masks and
    normalises). Gradients flow to `student_logits` only; neither input is modified.
    Collectives: csd and fkl/rkl-style statistics are combined with all-reduces on `tp_group`
    (csd: exactly one MAX and one SUM per call); backward communicates nothing.
    """
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a megatron_csd.losses.LossConfig, got {type(config).__name__}")
    _check_logits(student_logits, teacher_logits)
    local_width = student_logits.shape[-1]
    shard = describe_shard(local_width, tp_group, vocab_size)
    leading_shape = student_logits.shape[:-1]
    student = student_logits.reshape(-1, local_width)
    teacher = teacher_logits.reshape(-1, local_width)

    if config.objective == "csd":
        spec = CSDSpec(config.weights, config.temperature, config.mix, config.scale)
        loss = csd_loss(student, teacher, spec, shard)
    elif config.objective in KL_FAMILY:
        spec = DivergenceSpec(config.objective, config.temperature, config.skew, config.beta)
        loss = divergence_loss(student, teacher, spec, shard)
    elif config.objective == "dld":
        loss = logit_mse_loss(student, teacher, config.scale, shard)
    else:  # LossConfig already validated the name
        raise AssertionError(config.objective)
    return loss.view(leading_shape)
