"""Concrete Score Distillation on vocab-parallel logits, in O(V) per token.

Math (csd-math.md). Per token, with logit gap d[x] = zs[x] - zt[x] over the real, unmasked
vocabulary and constant (detached) normalised weight factors w1, w2 in {S, T, U, M}:

    L = scale / 2 * sum_{y,x} w1[y] w2[x] (d[x] - d[y])^2
      = scale / 2 * (v1 + v2 + (m1 - m2)^2),   m_a = sum_x a[x] d[x],  v_a = sum_x a[x] d[x]^2 - m_a^2
    dL/dzs[k] = scale * (w1[k] (d[k] - m2) + w2[k] (d[k] - m1))

S = softmax(zs / tau), T = softmax(zt / tau), U = uniform over the real unmasked vocabulary,
M = mix * T + (1 - mix) * S. Per *base* weight b in {S, T, U} (M is derived from S and T) only
the normaliser, mean and variance of the gap are needed. Each rank computes, over its shard,
Z_r = sum e_b, S_r = sum e_b d and the centred C_r = sum e_b (d - S_r / Z_r)^2 (e_b unnormalised);
the shards are combined exactly with the parallel-variance rule (Chan et al.), so no
E[d^2] - E[d]^2 cancellation happens anywhere.

Collectives (tensor-parallel group, whatever the weight pair):
  1. one MAX all-reduce of the stacked per-token maxima [max zs, max zt] ([tokens, 2] fp32);
  2. one SUM all-reduce of the per-rank moments [TP, tokens, 3 * num_bases] fp32 (each rank fills
     its own slot, so the sum gathers every shard's moments: 3 * TP scalars per token and base);
  backward: none. The gradient is elementwise once m1, m2 and Z_b are known; it is recomputed
  chunk by chunk from the saved inputs, so no [tokens, V] tensor is kept between passes.

Numerics: all statistics in fp32 (bf16/fp16 inputs are upcast chunk by chunk). The gap is shifted
per token by the maxima that the softmax weights need anyway, d' = (zs - max zs) - (zt - max zt),
which leaves L and its gradient unchanged (shift invariance) and keeps the gap small when the two
models' logits sit at very different offsets; variances are computed centred (see above).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from .row_ops import finish_maxima, local_row_maxima, row_chunks, safe_denominator, valid_columns
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
        """Base weights whose sums are reduced, in a fixed order (M needs S and T)."""
        needed = set()
        for factor in self.weights:
            needed.update(("S", "T") if factor == "M" else (factor,))
        return tuple(base for base in _BASE_ORDER if base in needed)


def _chunk_gap_and_exps(zs, zt, shift_s, shift_t, bases, temperature, masked_rows):
    """For one row chunk: the shifted gap d' and the unnormalised base weights e_b (fp32).

    `masked_rows` are chunk-local indices of rows with -inf columns: there d' and every e_b are
    set to 0 on the invalid columns, so those columns drop out of every sum and gradient.
    e_U is returned as None (it is 1 on valid columns) unless rows are masked, then it is the mask.
    """
    # Shift first: z - max z is exact for the columns near the maximum (Sterbenz), which are the
    # ones that carry softmax weight; subtracting the large raw logits first would round the gap.
    a_s = zs - shift_s.unsqueeze(-1)  # type promotion upcasts bf16/fp16 to the shift's dtype
    a_t = zt - shift_t.unsqueeze(-1)
    gap = a_s - a_t
    exps: Dict[str, torch.Tensor] = {}
    if "S" in bases:
        exps["S"] = (a_s if temperature == 1.0 else a_s.div_(temperature)).exp_()
    if "T" in bases:
        exps["T"] = (a_t if temperature == 1.0 else a_t.div_(temperature)).exp_()
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


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row dot product as a batched matrix product (no [rows, V] temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _local_moments(gap, exp_weight, valid_width):
    """[rows, 3] on this shard: Z_r = sum e, S_r = sum e d, C_r = sum e (d - S_r / Z_r)^2.

    Two passes over the (cache-resident) chunk: the centred second moment does not cancel the way
    sum e d^2 - (sum e d)^2 / Z does when the weighted mean gap is large against its spread.
    `exp_weight` None means e = 1 on every column (U on a row without masked columns); it is
    consumed (overwritten) otherwise.
    """
    if exp_weight is None:
        total = torch.full_like(gap[:, 0], float(valid_width))
        weighted_sum = gap.sum(-1)
    else:
        total = exp_weight.sum(-1)
        weighted_sum = _row_dot(exp_weight, gap)
    centred = gap - (weighted_sum / safe_denominator(total)).unsqueeze(-1)
    if exp_weight is None:
        centred_square_sum = _row_dot(centred, centred)
    else:
        centred_square_sum = _row_dot(exp_weight.mul_(centred), centred)
    return torch.stack((total, weighted_sum, centred_square_sum), dim=-1)


def _combine_shards(per_rank):
    """Exact parallel-variance combination (Chan et al.) of per-rank [Z_r, S_r, C_r] slots.

    per_rank: [world, rows, 3]. Returns (Z, mean, variance) per row:
    Z = sum Z_r, mean = sum S_r / Z, variance = sum (C_r + Z_r (m_r - mean)^2) / Z.
    """
    totals, sums, centred = per_rank.unbind(-1)
    total = totals.sum(0)
    mean = sums.sum(0) / safe_denominator(total)
    rank_means = sums / safe_denominator(totals)
    spread = (centred + totals * (rank_means - mean) ** 2).sum(0)
    return total, mean, spread / safe_denominator(total)


def _factor_moments(factor, moments, mix):
    """(mean, variance) of the gap under a normalised weight factor; M by the mixture rule."""
    if factor == "M":
        mean_t, var_t = _factor_moments("T", moments, mix)
        mean_s, var_s = _factor_moments("S", moments, mix)
        mean = mix * mean_t + (1 - mix) * mean_s
        variance = mix * (var_t + (mean_t - mean) ** 2) + (1 - mix) * (var_s + (mean_s - mean) ** 2)
        return mean, variance
    _, mean, variance = moments[factor]
    return mean, variance


def _chunk_factor_weight(factor, exps, totals, mix, start, end, width):
    """Normalised weight factor on a row chunk: e_b / Z_b (U: 1 / count; M: mixture)."""
    if factor == "M":
        return (_chunk_factor_weight("T", exps, totals, mix, start, end, width).mul_(mix)
                .add_(_chunk_factor_weight("S", exps, totals, mix, start, end, width), alpha=1 - mix))
    inverse_total = 1.0 / safe_denominator(totals[factor][start:end])
    if factor == "U" and exps["U"] is None:
        return inverse_total.unsqueeze(-1).expand(end - start, width)
    return exps[factor] * inverse_total.unsqueeze(-1)


class _CSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, spec: CSDSpec, shard: VocabShard):
        rows, width = student.shape[0], shard.valid_width
        zs, zt = student[:, :width], teacher[:, :width]
        maxima, masked = local_row_maxima(zs, zt)
        shard.all_reduce_max(maxima)
        empty = finish_maxima(maxima)

        # Each rank fills its own slot of [world, rows, 3 * bases]; the one SUM all-reduce then
        # hands every rank all shards' moments (volume independent of V) for an exact combination.
        bases = spec.bases
        per_rank = torch.zeros(shard.world_size, rows, 3 * len(bases), dtype=maxima.dtype, device=student.device)
        local = per_rank[shard.rank]
        if width:
            for start, end in row_chunks(rows, width):
                masked_rows = masked[start:end].nonzero().squeeze(-1)
                gap, exps = _chunk_gap_and_exps(zs[start:end], zt[start:end], maxima[start:end, 0],
                                                maxima[start:end, 1], bases, spec.temperature, masked_rows)
                for slot, base in enumerate(bases):
                    local[start:end, 3 * slot:3 * slot + 3] = _local_moments(gap, exps[base], width)
        shard.all_reduce_sum(per_rank)
        moments = {base: _combine_shards(per_rank[..., 3 * slot:3 * slot + 3]) for slot, base in enumerate(bases)}

        w1, w2 = spec.weights
        m1, var1 = _factor_moments(w1, moments, spec.mix)
        m2, var2 = _factor_moments(w2, moments, spec.mix)
        loss = (var1 + var2 + (m1 - m2) ** 2).mul_(0.5 * spec.scale).masked_fill_(empty, 0.0)

        totals = torch.stack([moments[base][0] for base in bases], dim=-1)
        ctx.save_for_backward(student, teacher, maxima, masked, empty, totals, m1, m2)
        ctx.spec, ctx.shard = spec, shard
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, maxima, masked, empty, totals, m1, m2 = ctx.saved_tensors
        spec, shard = ctx.spec, ctx.shard
        rows, width = student.shape[0], shard.valid_width
        grad = torch.empty_like(student, memory_format=torch.contiguous_format)
        if width < student.shape[1]:
            grad[:, width:] = 0
        if width == 0:
            return grad, None, None, None
        w1, w2 = spec.weights
        bases = spec.bases
        totals = {base: totals[:, slot] for slot, base in enumerate(bases)}
        # d(loss)/d(zs) carries the upstream gradient; empty rows get exactly 0.
        row_coeff = (grad_loss.to(maxima.dtype) * spec.scale).masked_fill_(empty, 0.0)
        zs, zt = student[:, :width], teacher[:, :width]
        for start, end in row_chunks(rows, width):
            masked_rows = masked[start:end].nonzero().squeeze(-1)
            gap, exps = _chunk_gap_and_exps(zs[start:end], zt[start:end], maxima[start:end, 0],
                                            maxima[start:end, 1], bases, spec.temperature, masked_rows)
            coeff = row_coeff[start:end].unsqueeze(-1)
            if w1 == w2:  # 2 w (d - m)
                weight = _chunk_factor_weight(w1, exps, totals, spec.mix, start, end, width)
                chunk_grad = gap.sub_(m1[start:end].unsqueeze(-1)).mul_(weight).mul_(2 * coeff)
            else:
                weight1 = _chunk_factor_weight(w1, exps, totals, spec.mix, start, end, width)
                weight2 = _chunk_factor_weight(w2, exps, totals, spec.mix, start, end, width)
                chunk_grad = (gap - m2[start:end].unsqueeze(-1)).mul_(weight1)
                chunk_grad.addcmul_(gap.sub_(m1[start:end].unsqueeze(-1)), weight2).mul_(coeff)
            grad[start:end, :width] = chunk_grad
        return grad, None, None, None


def csd_loss(student: torch.Tensor, teacher: torch.Tensor, spec: CSDSpec, shard: VocabShard) -> torch.Tensor:
    """Per-row CSD loss of 2-D `[rows, V_local]` logits (inputs already validated)."""
    return _CSDFunction.apply(student, teacher.detach(), spec, shard)
