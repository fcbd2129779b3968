"""The KL family's passes as fused compiled kernels (compiled.py); divergences.py has the math.

Same quantities as divergence_passes.py's chunked passes, over all local rows at once. Per row, in
its local frame: a_s = (zs - sh_s) / tau, a_t = (zt - sh_t) / tau, and after the all-reduces
log q = a_s - c_s, log p = a_t - c_t (sh = shifts, c = offsets). Masked columns (-inf in either
input) get 0 in every weight, term and gradient through an inline column mask. No communication.
"""
from __future__ import annotations

import torch

from .compiled import accumulate, column_mask, fused_kernel, row_maxima, shift_from_maxima


def _log_probs(logits, shifts, offsets, column, temperature):
    """log of a softmax factor in the row's local frame: (z - sh) / tau - c."""
    return (logits - shifts[:, column:column + 1]) / temperature - offsets[:, column:column + 1]


@fused_kernel
def divergence_first_pass(student, teacher, padding, temperature, objective):
    """Pass 1: (maxima (4 x [rows, 1], plain / masked of zs then zt), (Z_s, Z_t, D) [rows], e_s).

    e_s = exp(a_s) is returned fp32 with `padding` zero columns (it becomes the gradient for fp32
    logits); D = sum e_t (a_t - a_s) (fkl), sum e_s (a_s - a_t) (rkl), None otherwise.
    """
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    maxima = row_maxima(zs, valid) + row_maxima(zt, valid)
    a_s = (zs - shift_from_maxima(*maxima[:2])) / temperature
    a_t = (zt - shift_from_maxima(*maxima[2:])) / temperature
    stored = torch.nn.functional.pad(torch.where(valid, torch.exp(a_s), 0.0), (0, padding))
    e_s = stored[:, :zs.shape[1]]  # the sums read the output back: no other [rows, V] buffer
    e_t = torch.where(valid, torch.exp(a_t), 0.0)
    moment = None
    if objective == "fkl":
        moment = (e_t * torch.where(valid, a_t - a_s, 0.0)).sum(-1)
    elif objective == "rkl":
        moment = (e_s * torch.where(valid, a_s - a_t, 0.0)).sum(-1)
    return maxima, (e_s.sum(-1), e_t.sum(-1), moment), stored


def _mixture_terms(zs, zt, valid, e_s, shifts, offsets, scale_s, temperature, objective, share):
    """Per column of pass 2: (q, p, f, h'), f and h' 0 on masked columns (divergence_passes.py).

    q = e_s * scale_s, p = exp(log p); m = share * first + (1 - share) * second (jsd, skl: first p;
    srkl: first q), log m = log(max(m, tiny)); f the loss term; h' = h / H_SCALE:
    jsd q (log q - log m); skl p q / m; srkl q (log q - log m + 1 - a q / m); tvd (s = sign(q - p) / 2)
    has no h' (None) and f = |q - p| / 2.
    """
    q = e_s * scale_s.unsqueeze(-1)
    log_p = _log_probs(zt, shifts, offsets, 1, temperature)
    p = torch.where(valid, torch.exp(log_p), 0.0)
    if objective == "tvd":
        return q, p, torch.where(valid, 0.5 * (q - p).abs(), 0.0), None
    first, second = (q, p) if objective == "srkl" else (p, q)
    mixture = torch.clamp_min(share * first + (1 - share) * second, torch.finfo(torch.float32).tiny)
    log_m = torch.log(mixture)
    log_q = _log_probs(zs, shifts, offsets, 0, temperature)
    if objective == "skl":
        return q, p, torch.where(valid, p * (log_p - log_m), 0.0), torch.where(valid, q * p / mixture, 0.0)
    h_prime = torch.where(valid, q * (log_q - log_m), 0.0)
    if objective == "jsd":  # f = b p (log p - log m) + (1 - b) q (log q - log m)
        return q, p, share * torch.where(valid, p * (log_p - log_m), 0.0) + (1 - share) * h_prime, h_prime
    return q, p, h_prime, torch.where(valid, q * (log_q - log_m + 1 - share * q / mixture), 0.0)  # srkl


@fused_kernel
def divergence_second_pass(student, teacher, e_s, shifts, offsets, scale_s, temperature, objective, share):
    """Pass 2 (tvd, jsd, skl, srkl): (sum f, sum h) [rows] (tvd: sum h = sum q sign(q - p) / 2,
    otherwise sum h'). Writes nothing: the backward recomputes the terms from e_s (a kernel that
    also overwrote e_s would keep h' in an extra [rows, V] buffer)."""
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    q, p, loss, h_prime = _mixture_terms(zs, zt, valid, e_s, shifts, offsets, scale_s, temperature, objective, share)
    if h_prime is None:
        return loss.sum(-1), 0.5 * (q * torch.sign(q - p)).sum(-1)
    return loss.sum(-1), h_prime.sum(-1)


@fused_kernel
def divergence_gradient(student, teacher, e_s, out, shifts, offsets, scale_s, row_term, coeff, temperature,
                        objective, share, h_scale):
    """Backward: dL/dzs into `out` (None: overwrite `e_s`); coeff = upstream / tau per row.

      fkl   (q - p) coeff
      rkl   e_s ((zs - zt) + row_term) scale_s / tau coeff    row_term: divergences.py's per-row constant
      tvd   q (sign(q - p) / 2 - row_term) coeff             row_term: sum h
      other h_scale (h' - q row_term) coeff                   row_term: sum h'
    """
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    coeff, row_term = coeff.unsqueeze(-1), row_term.unsqueeze(-1)
    if objective == "rkl":
        grad = torch.where(valid, e_s * (zs - zt + row_term), 0.0) * (scale_s.unsqueeze(-1) / temperature * coeff)
    elif objective == "fkl":
        p = torch.where(valid, torch.exp(_log_probs(zt, shifts, offsets, 1, temperature)), 0.0)
        grad = (e_s * scale_s.unsqueeze(-1) - p) * coeff
    else:
        q, p, _, h_prime = _mixture_terms(zs, zt, valid, e_s, shifts, offsets, scale_s, temperature, objective, share)
        if h_prime is None:  # tvd
            grad = q * (0.5 * torch.sign(q - p) - row_term) * coeff
        else:
            grad = (h_prime - q * row_term) * (h_scale * coeff)
    (e_s if out is None else out).copy_(grad)
