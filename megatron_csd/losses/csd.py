"""Concrete Score Distillation on vocab-parallel logits, in O(V) per token.

Math (csd-math.md). Per token, with logit gap d[x] = zs[x] - zt[x] over the real, unmasked
vocabulary and constant (detached) normalised weight factors w1, w2 in {S, T, U, M}:

    L = scale / 2 * sum_{y,x} w1[y] w2[x] (d[x] - d[y])^2
      = scale / 2 * (v1 + v2 + (m1 - m2)^2),   m_a = sum_x a[x] d[x],  v_a = sum_x a[x] (d[x] - m_a)^2
    dL/dzs[k] = scale * (w1[k] (d[k] - m2) + w2[k] (d[k] - m1))

S = softmax(zs / tau), T = softmax(zt / tau), U = uniform over the real unmasked vocabulary,
M = mix * T + (1 - mix) * S. Per *base* weight b in {S, T, U} (M is derived from S and T) only
the normaliser, mean and variance of the gap are needed.

One streaming pass per rank (row chunks that stay in cache). Each chunk is shifted by its rows'
*local* maxima, z - max_local z, which is exact near the maximum (Sterbenz) where the softmax
weight sits; the local gap is d_loc = (zs - max_loc zs) - (zt - max_loc zt). Per base and row the
rank keeps Z_r = sum e_b, S_r = sum e_b d_loc and the centred C_r = sum e_b (d_loc - S_r / Z_r)^2
(e_b unnormalised, e_S = exp((zs - max_loc zs) / tau)). After the MAX all-reduce gives the global
maxima, the moments move to the global frame exactly: e_b scales by exp((max_loc - max) / tau) <= 1
and the gap shifts by a per-row constant (which the centred C_r does not see). The shards are then
combined with the parallel-variance rule (Chan et al.), so no E[d^2] - E[d]^2 cancellation happens.

Invalid input (row_ops): a row with NaN / +inf in either input is left out of the MAX, its moments
on that rank become NaN before the SUM, so its loss is NaN on every rank, and so is its gradient.

Collectives (tensor-parallel group, whatever the weight pair):
  1. one MAX all-reduce of the stacked per-token maxima [max zs, max zt] ([tokens, 2]);
  2. one SUM all-reduce of the per-rank moments [TP, tokens, 3 * num_bases] (each rank fills its
     own slot, so the sum gathers every shard's moments: 3 * TP scalars per token and base);
  backward: none; the gradient is elementwise once m1, m2 and Z_b are known.

Memory and speed: for pairs with a softmax factor the forward writes that factor's unnormalised
weights into one fp32 [tokens, V_local] buffer (the only large allocation); the backward turns
that buffer into the gradient in place (fp32 logits) without another exp. Other temporaries are
chunk-sized and reused. A second backward through the same graph (retain_graph) recomputes.
Statistics run in fp32 for fp32/bf16/fp16 logits (fp64 for fp64 logits).
Large CPU inputs run both passes as fused compiled kernels instead of the chunk loops
(csd_kernels.py, compiled.use_compiled); the per-row algebra and the collectives are shared.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .compiled import shifts_of, use_compiled
from .csd_kernels import csd_gradient, csd_local_moments
from .csd_moments import (SOFTMAX_COLUMN, chunk_factor_weight, combine_shards, factor_moments, row_weight_scales,
                          to_global_frame)
from .row_ops import (accumulation_dtype, chunk_row_maxima, for_each_chunk, invalid_rows, nan_where_loss_is_nan_,
                      safe_denominator, valid_columns, zero_empty_rows_)
from .vocab_shard import VocabShard

_BASE_ORDER = ("S", "T", "U")


@dataclass(frozen=True)
class CSDSpec:
    """What one CSD call computes: weight factors (w1, w2), tau, mix (for M), scale."""

    weights: str
    temperature: float
    mix: float
    scale: float

    @property
    def bases(self) -> Tuple[str, ...]:
        """Base weights whose moments are reduced, in a fixed order (M needs S and T)."""
        needed = set()
        for factor in self.weights:
            needed.update(("S", "T") if factor == "M" else (factor,))
        return tuple(base for base in _BASE_ORDER if base in needed)

    @property
    def stored_base(self) -> Optional[str]:
        """The softmax base whose weights the forward keeps for the backward (None: UU)."""
        return next((base for base in self.bases if base in SOFTMAX_COLUMN), None)


def _chunk_gap_and_exps(workspace, zs, zt, shifts, bases, temperature, masked_rows, stored=None, stored_out=None):
    """One row chunk: the shifted gap d_loc and the unnormalised base weights e_b.

    shifts: [rows, 2] per-row (student, teacher) shifts. `stored_out` (a _StoredChunk) holds the
    `stored` base's weights: a fresh one is written here (forward), otherwise it is read instead
    of recomputing the exp (backward). On masked rows (chunk-local indices) d and every e_b are
    zeroed on invalid columns, so those columns drop out of every sum and gradient.
    e_U is None (1 on every column) unless rows are masked, then it is the column mask.
    """
    rows = zs.shape[0]
    a_s = torch.sub(zs, shifts[:, 0:1], out=workspace.buffer("a_s", rows))  # bf16/fp16 computed in fp32
    a_t = torch.sub(zt, shifts[:, 1:2], out=workspace.buffer("a_t", rows))
    gap = torch.sub(a_s, a_t, out=workspace.buffer("gap", rows))
    exps: Dict[str, Optional[torch.Tensor]] = {}
    for base, shifted in (("S", a_s), ("T", a_t)):
        if base not in bases:
            continue
        if base == stored and stored_out is not None and not stored_out.fresh:
            exps[base] = stored_out.chunk  # the forward already computed (and masked) these
            continue
        scaled = shifted if temperature == 1.0 else shifted.div_(temperature)
        out = stored_out.chunk if base == stored and stored_out is not None else scaled
        exps[base] = torch.exp(scaled, out=out)
    if "U" in bases:
        exps["U"] = None
    if masked_rows.numel():
        valid = valid_columns(zs[masked_rows], zt[masked_rows])
        gap[masked_rows] = torch.where(valid, gap[masked_rows], 0.0)
        for base in bases:
            if base == "U":
                exps["U"] = torch.ones_like(gap)
            exps[base][masked_rows] = torch.where(valid, exps[base][masked_rows], 0.0)
    return gap, exps


@dataclass
class _StoredChunk:
    chunk: torch.Tensor
    fresh: bool  # True in the forward (to be written), False in the backward (to be read)


def _local_moments(workspace, gap, exp_weight, valid_width):
    """[rows, 3] on this shard: Z_r = sum e, S_r = sum e d, C_r = sum e (d - S_r / Z_r)^2.

    Two passes over the cache-resident chunk (the centred second moment does not cancel).
    `exp_weight` None means e = 1 on every column (U on a row without masked columns).
    """
    rows = gap.shape[0]
    product = workspace.buffer("product", rows)
    if exp_weight is None:
        total = torch.full_like(gap[:, 0], float(valid_width))
        weighted_sum = gap.sum(-1)
    else:
        total = exp_weight.sum(-1)
        weighted_sum = torch.mul(exp_weight, gap, out=product).sum(-1)
    centred = torch.sub(gap, (weighted_sum / safe_denominator(total)).unsqueeze(-1),
                        out=workspace.buffer("centred", rows))
    if exp_weight is None:
        torch.mul(centred, centred, out=product)
    else:
        torch.mul(exp_weight, centred, out=product).mul_(centred)
    return torch.stack((total, weighted_sum, product.sum(-1)), dim=-1)


def masked_rows_none(device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.long, device=device)


def _redo_masked_rows(workspace, zs, zt, spec, width, local_shifts, local, weights_store, row_ids):
    """Recompute shifts, moments and kept weights of rows that have -inf columns, with the mask."""
    dtype = local_shifts.dtype
    maxima, _ = chunk_row_maxima(zs, zt, dtype)
    local_shifts[row_ids] = maxima.masked_fill_(maxima == float("-inf"), 0.0)
    every_row = torch.arange(zs.shape[0], device=zs.device)
    store = None
    if weights_store is not None:
        store = _StoredChunk(torch.empty(zs.shape[0], width, dtype=dtype, device=zs.device), fresh=True)
    gap, exps = _chunk_gap_and_exps(workspace, zs, zt, local_shifts[row_ids], spec.bases, spec.temperature,
                                    every_row, spec.stored_base, store)
    for slot, base in enumerate(spec.bases):
        local[row_ids, 3 * slot:3 * slot + 3] = _local_moments(workspace, gap, exps[base], width)
    if store is not None:
        weights_store[row_ids, :width] = store.chunk


class _CSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, spec: CSDSpec, shard: VocabShard):
        rows, width = student.shape[0], shard.valid_width
        dtype = accumulation_dtype(student.dtype)
        zs, zt = student[:, :width], teacher[:, :width]
        bases, stored = spec.bases, spec.stored_base
        local_shifts = torch.zeros(rows, 2, dtype=dtype, device=student.device)
        masked = torch.zeros(rows, dtype=torch.bool, device=student.device)
        per_rank = torch.zeros(shard.world_size, rows, 3 * len(bases), dtype=dtype, device=student.device)
        local = per_rank[shard.rank]
        # The kept softmax weights; for fp32 logits it later becomes the gradient itself.
        weights_store, compiled = None, use_compiled(student, width)
        if stored is not None and width and not compiled:
            weights_store = torch.empty(rows, student.shape[1] if student.dtype == dtype else width,
                                        dtype=dtype, device=student.device)

        def chunk_moments(start, end, workspace):
            # Fast path: plain row maxima, no column mask. A -inf column makes its row's moments
            # inf or NaN (0 * -inf, or an infinite gap), so such rows are found afterwards and
            # redone with masked maxima; this keeps the common case at one max per input.
            local_shifts[start:end, 0] = zs[start:end].amax(-1)
            local_shifts[start:end, 1] = zt[start:end].amax(-1)
            store = None if weights_store is None else _StoredChunk(weights_store[start:end, :width], fresh=True)
            no_rows = masked_rows_none(student.device)
            gap, exps = _chunk_gap_and_exps(workspace, zs[start:end], zt[start:end], local_shifts[start:end],
                                            bases, spec.temperature, no_rows, stored, store)
            for slot, base in enumerate(bases):
                local[start:end, 3 * slot:3 * slot + 3] = _local_moments(workspace, gap, exps[base], width)
            redo = (~torch.isfinite(local[start:end]).all(-1)).nonzero().squeeze(-1)
            if redo.numel():
                masked[start + redo] = True
                _redo_masked_rows(workspace, zs[start:end][redo], zt[start:end][redo], spec, width,
                                  local_shifts, local, weights_store, start + redo)

        if compiled:  # the same statistics from one fused kernel (csd_kernels.py); `masked` is unused then
            padding = student.shape[1] - width if student.dtype == dtype else 0  # fp32: e becomes the gradient
            maxima, moments, weights_store = csd_local_moments(zs, zt, padding, spec.temperature, bases, stored)
            local_shifts = shifts_of(maxima)
            local.copy_(torch.stack(moments, dim=-1))
        else:
            for_each_chunk(rows, width, chunk_moments, dtype, student.device)
        invalid = invalid_rows(local_shifts)  # NaN / +inf input: kept out of the MAX, poisons the SUM
        local_present = (local[:, 0] > 0) & ~invalid  # rows with a valid column on this shard

        global_shifts = torch.where(local_present.unsqueeze(-1), local_shifts,
                                    torch.full_like(local_shifts, float("-inf")))
        shard.all_reduce_max(global_shifts)
        empty = global_shifts[:, 0] == float("-inf")  # no valid column anywhere: loss 0 (unless NaN)
        global_shifts.masked_fill_(empty.unsqueeze(-1), 0.0)
        for slot, base in enumerate(bases):
            to_global_frame(local[:, 3 * slot:3 * slot + 3], base, local_shifts, global_shifts, spec.temperature)
        local[invalid] = float("nan")
        shard.all_reduce_sum(per_rank)
        moments = {base: combine_shards(per_rank[..., 3 * slot:3 * slot + 3]) for slot, base in enumerate(bases)}

        w1, w2 = spec.weights
        m1, var1 = factor_moments(w1, moments, spec.mix)
        m2, var2 = factor_moments(w2, moments, spec.mix)
        loss = zero_empty_rows_((var1 + var2 + (m1 - m2) ** 2).mul_(0.5 * spec.scale), empty)

        totals = torch.stack([moments[base][0] for base in bases], dim=-1)
        # Means in each row's local frame, so the backward can use d_loc directly.
        offset = (local_shifts[:, 0] - global_shifts[:, 0]) - (local_shifts[:, 1] - global_shifts[:, 1])
        ctx.save_for_backward(student, teacher, local_shifts, global_shifts, masked, local_present & ~empty,
                              totals, m1 - offset, m2 - offset, loss.isnan())
        ctx.spec, ctx.shard, ctx.weights_store, ctx.compiled = spec, shard, weights_store, compiled
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, local_shifts, global_shifts, masked, present, totals, m1, m2, loss_is_nan = ctx.saved_tensors
        spec, shard = ctx.spec, ctx.shard
        weights_store, ctx.weights_store = ctx.weights_store, None  # consumed: a second backward recomputes
        rows, width = student.shape[0], shard.valid_width
        dtype = local_shifts.dtype
        in_place = weights_store is not None and weights_store.shape == student.shape
        grad = weights_store if in_place else torch.empty_like(student, memory_format=torch.contiguous_format)
        if width < student.shape[1]:
            grad[:, width:] = 0
        if width == 0:
            return grad, None, None, None
        bases, stored = spec.bases, spec.stored_base
        scales = row_weight_scales(bases, totals, local_shifts, global_shifts, present, spec.temperature, spec.mix)
        row_coeff = nan_where_loss_is_nan_(grad_loss.to(dtype) * spec.scale, loss_is_nan)
        w1, w2 = spec.weights
        zs, zt = student[:, :width], teacher[:, :width]
        if ctx.compiled:
            factor_scales = torch.stack([scales.get(base, torch.zeros_like(row_coeff)) for base in "STU"], dim=-1)
            store = None if weights_store is None else weights_store[:, :width]
            csd_gradient(zs, zt, store, None if in_place else grad[:, :width], local_shifts, torch.stack((m1, m2), -1),
                         factor_scales, row_coeff, spec.temperature, spec.mix, spec.weights, stored)
            return grad, None, None, None

        def chunk_grad(start, end, workspace):
            masked_rows = masked[start:end].nonzero().squeeze(-1)
            store = None if weights_store is None else _StoredChunk(weights_store[start:end, :width], fresh=False)
            gap, exps = _chunk_gap_and_exps(workspace, zs[start:end], zt[start:end], local_shifts[start:end],
                                            bases, spec.temperature, masked_rows, stored, store)
            coeff = row_coeff[start:end].unsqueeze(-1)
            out = grad[start:end, :width] if grad.dtype == dtype else None
            weight1, scale1 = chunk_factor_weight(w1, exps, scales, start, end)
            if w1 == w2:  # scale * 2 w (d - m)
                centred = gap.sub_(m1[start:end].unsqueeze(-1))
                row_factor = (2 * scale1).unsqueeze(-1) * coeff
                if weight1 is None:
                    result = torch.mul(centred, row_factor, out=out)
                else:  # weight1 may be the stored chunk, which may also be `out`
                    result = torch.mul(weight1, centred, out=out if out is not None else weight1)
                    result.mul_(row_factor)
            else:  # scale * (w1 (d - m2) + w2 (d - m1))
                weight2, scale2 = chunk_factor_weight(w2, exps, scales, start, end)
                first = torch.sub(gap, m2[start:end].unsqueeze(-1), out=workspace.buffer("centred", end - start))
                first.mul_(scale1.unsqueeze(-1) * coeff)
                if weight1 is not None:
                    first.mul_(weight1)
                second = gap.sub_(m1[start:end].unsqueeze(-1)).mul_(scale2.unsqueeze(-1) * coeff)
                if weight2 is None:
                    result = torch.add(first, second, out=out)
                else:  # weight2 may be `out` (the stored chunk): it is read before it is written
                    result = torch.addcmul(first, second, weight2, out=out)
            if out is None:
                grad[start:end, :width] = result

        for_each_chunk(rows, width, chunk_grad, dtype, student.device)
        return grad, None, None, None


def csd_loss(student: torch.Tensor, teacher: torch.Tensor, spec: CSDSpec, shard: VocabShard) -> torch.Tensor:
    """Per-row CSD loss of 2-D `[rows, V_local]` logits (inputs already validated)."""
    return _CSDFunction.apply(student, teacher.detach(), spec, shard)
