"""Per-row moment algebra of CSD (see csd.py): frames, shard combination, weight factors.

All functions act on per-token statistics ([rows] or [rows, 3] tensors), never on [rows, V]
logits, and communicate nothing. They need not carry NaN themselves (safe_denominator maps a
NaN total to 1): invalid rows are poisoned right before the SUM all-reduce, after which the
combined moments and the loss are NaN, and the backward keys NaN gradients off the loss.
"""
from __future__ import annotations

import torch

from .row_ops import safe_denominator

SOFTMAX_COLUMN = {"S": 0, "T": 1}  # which column of the [max zs, max zt] maxima shifts each base


def to_global_frame(local_moments, base, local_shifts, global_shifts, temperature):
    """Move one base's [rows, 3] local moments from the local-max frame to the global one, in place.

    e_b scales by exp((max_loc - max) / tau) (S, T; U is unscaled); every gap shifts by
    offset = (max_loc zs - max zs) - (max_loc zt - max zt), so S_r = Z_r (m_r + offset); C_r only
    scales. Rows without a valid local column (Z_r = 0) stay 0.
    """
    totals, sums, centred = local_moments.unbind(-1)
    present = totals > 0
    means = sums / safe_denominator(totals)
    offset = (local_shifts[:, 0] - global_shifts[:, 0]) - (local_shifts[:, 1] - global_shifts[:, 1])
    if base in SOFTMAX_COLUMN:
        column = SOFTMAX_COLUMN[base]
        factor = ((local_shifts[:, column] - global_shifts[:, column]) / temperature).exp()
        factor = torch.where(present, factor, torch.zeros_like(factor))
        totals.mul_(factor)
        centred.mul_(factor)
    sums.copy_(torch.where(present, totals * (means + torch.where(present, offset, torch.zeros_like(offset))),
                           torch.zeros_like(sums)))


def combine_shards(per_rank):
    """Exact parallel-variance combination of per-rank [Z_r, S_r, C_r] slots ([world, rows, 3]).

    Returns (Z, mean, variance) per row: Z = sum Z_r, mean = sum S_r / Z,
    variance = sum (C_r + Z_r (m_r - mean)^2) / Z.
    """
    totals, sums, centred = per_rank.unbind(-1)
    total = totals.sum(0)
    mean = sums.sum(0) / safe_denominator(total)
    rank_means = sums / safe_denominator(totals)
    spread = (centred + totals * (rank_means - mean) ** 2).sum(0)
    return total, mean, spread / safe_denominator(total)


def factor_moments(factor, moments, mix):
    """(mean, variance) of the gap under a normalised weight factor; M by the mixture rule."""
    if factor == "M":
        mean_t, var_t = factor_moments("T", moments, mix)
        mean_s, var_s = factor_moments("S", moments, mix)
        mean = mix * mean_t + (1 - mix) * mean_s
        variance = mix * (var_t + (mean_t - mean) ** 2) + (1 - mix) * (var_s + (mean_s - mean) ** 2)
        return mean, variance
    _, mean, variance = moments[factor]
    return mean, variance


def row_weight_scales(bases, totals, local_shifts, global_shifts, local_present, temperature, mix):
    """Per-row factors r_b with w_b = e_b(local frame) * r_b, and the M mixture coefficients."""
    scales = {}
    for slot, base in enumerate(bases):
        inverse_total = 1.0 / safe_denominator(totals[:, slot])
        if base in SOFTMAX_COLUMN:
            column = SOFTMAX_COLUMN[base]
            inverse_total = inverse_total * ((local_shifts[:, column] - global_shifts[:, column]) / temperature).exp()
        scales[base] = torch.where(local_present, inverse_total, torch.zeros_like(inverse_total))
    if "S" in scales and "T" in scales:
        scales["M"] = (scales["T"] * mix, scales["S"] * (1 - mix))
    return scales


def chunk_factor_weight(factor, exps, scales, start, end):
    """Normalised weight of a factor on a row chunk as (tensor or None meaning 1, per-row scale).

    S/T/U return workspace or stored buffers that the caller may overwrite; M allocates.
    """
    if factor == "M":
        share_t, share_s = scales["M"]
        mixture = exps["T"] * share_t[start:end].unsqueeze(-1)
        mixture.add_(exps["S"] * share_s[start:end].unsqueeze(-1))
        return mixture, torch.ones_like(share_t[start:end])
    return exps[factor], scales[factor][start:end]
