"""The loss function of the fused path: ``loss_func``'s contract from captured head inputs.

With ``loss.fused_output_loss`` the last stage's ``DistillationStage`` returns the student's
(and the teacher's) :class:`~megatron_csd.models.output_capture.HeadInputs` instead of logits;
``fused_loss_func`` computes the same 3-tuple ``(loss_sum, num_tokens, metrics)`` as
``objective.loss_func`` with ``fused_loss.fused_output_loss`` (token chunks, no full logits).
Masking, metrics and their order are those of ``objective.loss_func``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class FusedHeads(NamedTuple):
    """The last stage's output in fused mode (the schedule passes it to the loss function)."""

    student: object                 # HeadInputs
    teacher: Optional[object]       # HeadInputs, or None (sft)


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def fused_loss_func(batch: dict, heads: FusedHeads, spec, evaluating: bool, output_tensor=None):
    """``objective.loss_func`` for captured head inputs; ``output_tensor`` (a placeholder) is unused."""
    from megatron_csd.training.fused_loss import fused_output_loss

    mask = batch["loss_mask"] > 0
    labels = torch.where(mask, batch["labels"], torch.zeros_like(batch["labels"]))
    num_tokens = mask.sum().to(torch.int)
    count = num_tokens.to(torch.float32)
    loss_sum, stats = fused_output_loss(heads.student, heads.teacher if spec.distill else None,
                                        labels, mask, spec, evaluating=evaluating)
    metrics = {}
    if spec.distill:
        metrics["kd"] = torch.stack([_masked_sum(stats.kd, mask), count])
    metrics["ce"] = torch.stack([_masked_sum(stats.ce, mask), count])
    if evaluating and spec.distill:
        metrics["teacher_ce"] = torch.stack([_masked_sum(stats.teacher_ce, mask), count])
    metrics["loss"] = torch.stack([loss_sum.detach(), count])
    return loss_sum, num_tokens, metrics
