"""Direct logit distillation (`dld`): scale / 2 * mean over the real vocabulary of (zs - zt)^2.

Raw logits (no temperature, no shift). The mean runs over the real, unmasked vocabulary of each
token, so a column that is -inf in either input counts like padding.
Gradient: dL/dzs[k] = scale * (zs[k] - zt[k]) / |V_valid|.
Collectives: one SUM all-reduce of [sum d^2, |V_valid|] per token; backward needs none.
NaN / +inf input (row_ops): the row's sum d^2 becomes NaN before the SUM, so its loss and
gradient are NaN on every rank.
"""
from __future__ import annotations

import torch

from .row_ops import (accumulation_dtype, invalid_rows, local_row_maxima, nan_where_loss_is_nan_, row_chunks,
                      safe_denominator, valid_columns)
from .vocab_shard import VocabShard


def _chunk_gap(zs, zt, masked_rows):
    accumulate = accumulation_dtype(zs.dtype)
    gap = zs.to(accumulate) - zt.to(accumulate)
    count = torch.full_like(gap[:, 0], float(gap.shape[1]))
    if masked_rows.numel():
        valid = valid_columns(zs[masked_rows], zt[masked_rows])
        gap[masked_rows] = torch.where(valid, gap[masked_rows], 0.0)
        count[masked_rows] = valid.sum(-1, dtype=accumulate)
    return gap, count


def _masked_and_invalid_rows(zs, zt):
    # Only the row flags are needed here; the maxima come along from the same pass.
    maxima, masked = local_row_maxima(zs, zt)
    return masked, invalid_rows(maxima)


class _LogitMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, scale: float, shard: VocabShard):
        rows, width = student.shape[0], shard.valid_width
        zs, zt = student[:, :width], teacher[:, :width]
        masked, invalid = _masked_and_invalid_rows(zs, zt)
        sums = torch.zeros(rows, 2, dtype=accumulation_dtype(student.dtype), device=student.device)  # [sum d^2, count]
        for start, end in (row_chunks(rows, width) if width else []):
            gap, count = _chunk_gap(zs[start:end], zt[start:end], masked[start:end].nonzero().squeeze(-1))
            sums[start:end, 0] = torch.bmm(gap.unsqueeze(1), gap.unsqueeze(2)).view(-1)
            sums[start:end, 1] = count
        sums[invalid, 0] = float("nan")  # +inf would give an inf loss: invalid input is NaN
        shard.all_reduce_sum(sums)
        count = safe_denominator(sums[:, 1])
        loss = sums[:, 0] * (0.5 * scale) / count
        ctx.save_for_backward(student, teacher, masked, count, loss.isnan())
        ctx.scale, ctx.shard = scale, shard
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, masked, count, loss_is_nan = ctx.saved_tensors
        rows, width = student.shape[0], ctx.shard.valid_width
        grad = torch.zeros_like(student, memory_format=torch.contiguous_format)
        row_coeff = nan_where_loss_is_nan_(grad_loss.to(count.dtype) * ctx.scale / count, loss_is_nan)
        zs, zt = student[:, :width], teacher[:, :width]
        for start, end in (row_chunks(rows, width) if width else []):
            gap, _ = _chunk_gap(zs[start:end], zt[start:end], masked[start:end].nonzero().squeeze(-1))
            grad[start:end, :width] = gap.mul_(row_coeff[start:end].unsqueeze(-1))
        return grad, None, None, None


def logit_mse_loss(student, teacher, scale: float, shard: VocabShard) -> torch.Tensor:
    """Per-row `dld` loss of 2-D `[rows, V_local]` logits (inputs already validated)."""
    return _LogitMSEFunction.apply(student, teacher.detach(), scale, shard)
