"""Direct logit distillation (`dld`): scale / 2 * mean over the real vocabulary of (zs - zt)^2.

Raw logits (no temperature, no shift). The mean runs over the real, unmasked vocabulary of each
token, so a column that is -inf in either input counts like padding.
Gradient: dL/dzs[k] = scale * (zs[k] - zt[k]) / |V_valid|.

One pass (row chunks, for_each_chunk): the gap d = zs - zt is written into the fp32 buffer that
the backward turns into the gradient in place (one multiply by the per-row factor), and
sum d^2 is taken from the cache-resident chunk. Masked columns are not searched for: a -inf in
either input makes the row's sum d^2 non-finite (as do NaN and +inf), and only such rows are
redone with the column mask and the row maxima (which tell NaN / +inf input apart).
Collectives: one SUM all-reduce of [sum d^2, |V_valid|] per token; backward needs none.
NaN / +inf input (row_ops): the row's sum d^2 becomes NaN before the SUM, so its loss and
gradient are NaN on every rank. A second backward through the same graph recomputes the gap.
"""
from __future__ import annotations

import torch

from .row_ops import (accumulation_dtype, chunk_row_maxima, difference_into, for_each_chunk, invalid_rows, nan_where_loss_is_nan_,
                      safe_denominator, valid_columns)
from .vocab_shard import VocabShard


def _gap_pass(zs, zt, gap_store, sums, masked):
    """Writes d into `gap_store` ([rows, width], 0 on masked columns) and [sum d^2, count] into sums."""
    width = zs.shape[1]

    def chunk(start, end, workspace):
        gap = difference_into(gap_store[start:end], zs[start:end], zt[start:end])
        squares = torch.mul(gap, gap, out=workspace.buffer("squares", end - start))
        sums[start:end, 0] = squares.sum(-1)
        sums[start:end, 1] = float(width)
        redo = (~torch.isfinite(sums[start:end, 0])).nonzero().squeeze(-1)
        if redo.numel():
            ids = start + redo
            maxima, _ = chunk_row_maxima(zs[ids], zt[ids], gap_store.dtype)
            valid = valid_columns(zs[ids], zt[ids])
            masked_gap = torch.where(valid, gap_store[ids], 0.0)
            gap_store[ids] = masked_gap
            masked[ids] = True
            sums[ids, 0] = torch.where(invalid_rows(maxima), float("nan"), (masked_gap * masked_gap).sum(-1))
            sums[ids, 1] = valid.sum(-1, dtype=sums.dtype)

    for_each_chunk(zs.shape[0], width, chunk, gap_store.dtype, zs.device)


class _LogitMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, scale: float, shard: VocabShard):
        rows, width = student.shape[0], shard.valid_width
        dtype = accumulation_dtype(student.dtype)
        zs, zt = student[:, :width], teacher[:, :width]
        in_place = student.dtype == dtype  # the gap buffer becomes the gradient
        store = torch.empty(rows, student.shape[1] if in_place else width, dtype=dtype, device=student.device)
        sums = torch.zeros(rows, 2, dtype=dtype, device=student.device)  # [sum d^2, count]
        masked = torch.zeros(rows, dtype=torch.bool, device=student.device)
        _gap_pass(zs, zt, store[:, :width], sums, masked)
        shard.all_reduce_sum(sums)
        count = safe_denominator(sums[:, 1])
        loss = sums[:, 0] * (0.5 * scale) / count
        ctx.save_for_backward(student, teacher, count, loss.isnan())
        ctx.scale, ctx.shard, ctx.store = scale, shard, store
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, count, loss_is_nan = ctx.saved_tensors
        store, ctx.store = ctx.store, None  # consumed: a second backward recomputes it
        width = ctx.shard.valid_width
        if store is None:
            store = torch.empty(student.shape[0], width, dtype=count.dtype, device=student.device)
            _gap_pass(student[:, :width], teacher[:, :width], store, torch.zeros_like(store[:, :2]),
                      torch.zeros(student.shape[0], dtype=torch.bool, device=student.device))
        row_coeff = nan_where_loss_is_nan_(grad_loss.to(count.dtype) * ctx.scale / count, loss_is_nan)
        if store.shape == student.shape:  # padded columns get 0, also on NaN rows
            store[:, :width].mul_(row_coeff.unsqueeze(-1))
            store[:, width:] = 0
            return store, None, None, None
        grad = torch.zeros_like(student, memory_format=torch.contiguous_format)
        grad[:, :width] = store.mul_(row_coeff.unsqueeze(-1))
        return grad, None, None, None


def logit_mse_loss(student, teacher, scale: float, shard: VocabShard) -> torch.Tensor:
    """Per-row `dld` loss of 2-D `[rows, V_local]` logits (inputs already validated)."""
    return _LogitMSEFunction.apply(student, teacher.detach(), scale, shard)
