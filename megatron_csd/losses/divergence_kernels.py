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
def divergence_first_pass(student, teacher, store, temperature, objective):
    """Pass 1: (maxima (4 x [rows, 1], plain / masked of zs then zt), (Z_s, Z_t, D) [rows]).

    fkl / rkl: writes e_s = exp(a_s) into `store` (fp32 [rows, V], possibly a column slice of the
    buffer that becomes the gradient); D = sum e_t (a_t - a_s) (fkl), sum e_s (a_s - a_t) (rkl).
    Otherwise `store` is None and so is D (pass 2 writes the store).
    """
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    maxima = row_maxima(zs, valid) + row_maxima(zt, valid)
    a_s = (zs - shift_from_maxima(*maxima[:2])) / temperature
    a_t = (zt - shift_from_maxima(*maxima[2:])) / temperature
    e_s = torch.where(valid, torch.exp(a_s), 0.0)
    e_t = torch.where(valid, torch.exp(a_t), 0.0)
    moment = None
    if objective == "fkl":
        moment = (e_t * torch.where(valid, a_t - a_s, 0.0)).sum(-1)
    elif objective == "rkl":
        moment = (e_s * torch.where(valid, a_s - a_t, 0.0)).sum(-1)
    if store is not None:
        store.copy_(e_s)
    return maxima, (e_s.sum(-1), e_t.sum(-1), moment)


def _mixture_terms(zs, zt, valid, shifts, offsets, temperature, objective, share):
    """Per column of pass 2: (f, h'), both 0 on masked columns (divergence_passes.py).

    q = exp(log q), p = exp(log p); m = share * first + (1 - share) * second (jsd, skl: first p;
    srkl: first q), log m = log(max(m, tiny)); f the loss term; h' = h / H_SCALE:
      tvd  f = |q - p| / 2,                    h' = q sign(q - p) / 2
      jsd  f = b p (log p - log m) + (1 - b) h',  h' = q (log q - log m)
      skl  f = p (log p - log m),              h' = p q / m
      srkl f = q (log q - log m),              h' = q (log q - log m + 1 - a q / m)
    """
    log_q = _log_probs(zs, shifts, offsets, 0, temperature)
    log_p = _log_probs(zt, shifts, offsets, 1, temperature)
    q = torch.where(valid, torch.exp(log_q), 0.0)
    p = torch.where(valid, torch.exp(log_p), 0.0)
    if objective == "tvd":
        return torch.where(valid, 0.5 * (q - p).abs(), 0.0), torch.where(valid, 0.5 * q * torch.sign(q - p), 0.0)
    first, second = (q, p) if objective == "srkl" else (p, q)
    mixture = torch.clamp_min(share * first + (1 - share) * second, torch.finfo(torch.float32).tiny)
    log_m = torch.log(mixture)
    if objective == "skl":
        return torch.where(valid, p * (log_p - log_m), 0.0), torch.where(valid, q * p / mixture, 0.0)
    student_term = torch.where(valid, q * (log_q - log_m), 0.0)
    if objective == "jsd":
        return share * torch.where(valid, p * (log_p - log_m), 0.0) + (1 - share) * student_term, student_term
    return student_term, torch.where(valid, q * (log_q - log_m + 1 - share * q / mixture), 0.0)  # srkl


@fused_kernel
def divergence_second_pass(student, teacher, store, shifts, offsets, temperature, objective, share):
    """Pass 2 (tvd, jsd, skl, srkl): (sum f, sum h') [rows]; writes h' into `store` (fp32
    [rows, V], possibly a column slice of the buffer that becomes the gradient)."""
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    loss, h_prime = _mixture_terms(zs, zt, valid, shifts, offsets, temperature, objective, share)
    store.copy_(h_prime)
    return loss.sum(-1), h_prime.sum(-1)


@fused_kernel
def divergence_gradient(student, teacher, stored, out, shifts, offsets, scale_s, row_term, coeff, temperature,
                        objective, h_scale):
    """Backward: dL/dzs into `out` (None: overwrite `stored`); coeff = upstream / tau per row.

      fkl   (q - p) coeff                                 stored: e_s (q = e_s scale_s)
      rkl   e_s ((zs - zt) + row_term) scale_s / tau coeff  stored: e_s; row_term: divergences.py's constant
      other h_scale (h' - q row_term) coeff                 stored: h'; row_term: sum h'; q = exp(log q)
    """
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    coeff, row_term = coeff.unsqueeze(-1), row_term.unsqueeze(-1)
    if objective == "rkl":
        grad = torch.where(valid, stored * (zs - zt + row_term), 0.0) * (scale_s.unsqueeze(-1) / temperature * coeff)
    elif objective == "fkl":
        p = torch.where(valid, torch.exp(_log_probs(zt, shifts, offsets, 1, temperature)), 0.0)
        grad = (stored * scale_s.unsqueeze(-1) - p) * coeff
    else:
        q = torch.where(valid, torch.exp(_log_probs(zs, shifts, offsets, 0, temperature)), 0.0)
        grad = (stored - q * row_term) * (h_scale * coeff)
    (stored if out is None else out).copy_(grad)
