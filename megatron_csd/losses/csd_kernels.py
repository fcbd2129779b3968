"""CSD's two passes as fused compiled kernels (compiled.py); csd.py has the math and collectives.

Same quantities as csd.py's chunked passes, over all local rows at once, in each row's local frame
(shifted by this rank's row maxima sh = [max zs, max zt] over valid columns):
  a_s = zs - sh_s, a_t = zt - sh_t, d_loc = a_s - a_t (0 on masked columns),
  e_S = exp(a_s / tau), e_T = exp(a_t / tau), e_U = 1 (all 0 on masked columns).
Masked columns (-inf in either input) are handled inline by a column mask, so no row needs a
second, masked pass. No communication here.
"""
from __future__ import annotations

import torch

from .compiled import accumulate, column_mask, fused_kernel, row_maxima, shift_from_maxima


def _base_weight(base, a_s, a_t, valid, temperature):
    """Unnormalised weight e_b of a base on valid columns (0 elsewhere)."""
    if base == "U":
        return valid.to(a_s.dtype)
    shifted = a_s if base == "S" else a_t
    return torch.where(valid, torch.exp(shifted / temperature), 0.0)


def _local_frame(student, teacher, shifts=None):
    """(valid, maxima, a_s, a_t, d_loc); the shifts are found (and their maxima returned as
    (plain zs, masked zs, plain zt, masked zt), each [rows, 1]) unless given ([rows, 2])."""
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    maxima = ()
    if shifts is None:
        maxima = row_maxima(zs, valid) + row_maxima(zt, valid)
        shift_s, shift_t = shift_from_maxima(*maxima[:2]), shift_from_maxima(*maxima[2:])
    else:
        shift_s, shift_t = shifts[:, 0:1], shifts[:, 1:2]
    a_s, a_t = zs - shift_s, zt - shift_t
    return valid, maxima, a_s, a_t, torch.where(valid, a_s - a_t, 0.0)


@fused_kernel
def csd_local_moments(student, teacher, padding, temperature, bases, stored):
    """Forward pass: (maxima (4 x [rows, 1], see _local_frame), moments (3 * len(bases) x [rows]), e_stored).

    Per-row results are separate outputs: a stack, or a boolean reduction, inside the kernel
    splits its row loop in several and the logits would be read from memory more than once.

    Per base b in `bases`: Z_r = sum e_b, S_r = sum e_b d_loc, C_r = sum e_b (d_loc - S_r / Z_r)^2
    (centred in a second inner loop over the cache-resident row: no E[d^2] - E[d]^2 cancellation).
    e_stored: the `stored` base's weights e_b (None if none), fp32 [rows, width + padding] with
    zeros in the `padding` columns.
    """
    valid, maxima, a_s, a_t, gap = _local_frame(student, teacher)
    moments, stored_weights = [], None
    for base in bases:
        weight = _base_weight(base, a_s, a_t, valid, temperature)
        if base == stored:  # a kernel output, full width (zero padding) when it becomes the gradient
            stored_weights = torch.nn.functional.pad(weight, (0, padding))
            weight = stored_weights[:, :weight.shape[1]]  # the sums read it back: no other [rows, V] buffer
        total = weight.sum(-1)
        weighted = (weight * gap).sum(-1)
        centred = gap - (weighted / torch.where(total > 0, total, 1.0)).unsqueeze(-1)
        moments += [total, weighted, (weight * centred * centred).sum(-1)]
    return maxima, moments, stored_weights


@fused_kernel
def csd_gradient(student, teacher, store, out, shifts, means, scales, coeff, temperature, mix, weights, stored):
    """Backward pass: dL/dzs = coeff * (w1 (d_loc - m2) + w2 (d_loc - m1)), written into `out`.

    means: [rows, 2] = (m1, m2) in the local frame; scales: [rows, 3] per-row normalisers
    (r_S, r_T, r_U) so that w_b = e_b * r_b, and w_M = mix * w_T + (1 - mix) * w_S; coeff: [rows]
    upstream gradient times scale. `store` (None: recompute) holds the `stored` base's e_b;
    `out` None means the gradient overwrites `store` (fp32 logits).
    """
    valid, _, a_s, a_t, gap = _local_frame(student, teacher, shifts)
    slot = {"S": 0, "T": 1, "U": 2}

    def normalised(factor):
        if factor == "M":
            return normalised("T") * mix + normalised("S") * (1 - mix)
        if factor == stored and store is not None:
            weight = store
        else:
            weight = _base_weight(factor, a_s, a_t, valid, temperature)
        return weight * scales[:, slot[factor]:slot[factor] + 1]

    first, second = weights
    m1, m2 = means[:, 0:1], means[:, 1:2]
    if first == second:
        grad = 2 * normalised(first) * (gap - m1)
    else:
        grad = normalised(first) * (gap - m2) + normalised(second) * (gap - m1)
    grad = grad * coeff.unsqueeze(-1)
    (store if out is None else out).copy_(grad)
