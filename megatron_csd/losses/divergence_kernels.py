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


def _local_exps(student, teacher, temperature):
    """(column mask, the four row maxima, (a_s, a_t), (e_s, e_t) = exp(a), 0 on masked columns)."""
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    maxima = row_maxima(zs, valid) + row_maxima(zt, valid)
    a_s = (zs - shift_from_maxima(*maxima[:2])) / temperature
    a_t = (zt - shift_from_maxima(*maxima[2:])) / temperature
    e_s, e_t = torch.where(valid, torch.exp(a_s), 0.0), torch.where(valid, torch.exp(a_t), 0.0)
    return valid, maxima, (a_s, a_t), (e_s, e_t)


def _moment(valid, a_s, a_t, e_s, e_t, objective):
    """D = sum e_t (a_t - a_s) (fkl) or sum e_s (a_s - a_t) (rkl), per row."""
    if objective == "fkl":
        return (e_t * torch.where(valid, a_t - a_s, 0.0)).sum(-1)
    return (e_s * torch.where(valid, a_s - a_t, 0.0)).sum(-1)


@fused_kernel
def divergence_first_pass(student, teacher, store, temperature, objective):
    """Pass 1: (maxima (4 x [rows, 1], plain / masked of zs then zt), (Z_s, Z_t, D) [rows]).

    fkl / rkl: writes e_s = exp(a_s) into `store` (fp32 [rows, V], possibly a column slice of the
    buffer that becomes the gradient); D = sum e_t (a_t - a_s) (fkl), sum e_s (a_s - a_t) (rkl).
    Otherwise `store` is None and so is D (pass 2 writes the store).
    """
    valid, maxima, (a_s, a_t), (e_s, e_t) = _local_exps(student, teacher, temperature)
    moment = _moment(valid, a_s, a_t, e_s, e_t, objective) if objective in ("fkl", "rkl") else None
    if store is not None:
        store.copy_(e_s)
    return maxima, (e_s.sum(-1), e_t.sum(-1), moment)


def _mixture_terms(q, p, valid, log_ratios, mixture, frame, objective, share):
    """Per column: (f, h'), both 0 on masked columns (divergence_passes.py).

    q, p the probabilities; log_ratios = (log q - log m, log p - log m + C) with C a per-row
    constant (0 in pass 2; in the single pass the caller removes the teacher term's share of
    C * sum p from sum f); m = mixture / frame (_floored_mixture; frame: 1 in pass 2, Z_s in the
    single pass); h' = h / H_SCALE:
      tvd  f = |q - p| / 2,                    h' = q sign(q - p) / 2
      jsd  f = b p (log p - log m) + (1 - b) h',  h' = q (log q - log m)
      skl  f = p (log p - log m),              h' = p q / m
      srkl f = q (log q - log m),              h' = q (log q - log m + 1 - a q / m)
    """
    if objective == "tvd":
        return torch.where(valid, 0.5 * (q - p).abs(), 0.0), torch.where(valid, 0.5 * q * torch.sign(q - p), 0.0)
    gap_q, gap_p = log_ratios
    if objective == "skl":
        return torch.where(valid, p * gap_p, 0.0), torch.where(valid, q * p * frame / mixture, 0.0)
    student_term = torch.where(valid, q * gap_q, 0.0)
    if objective == "jsd":
        return share * torch.where(valid, p * gap_p, 0.0) + (1 - share) * student_term, student_term
    return student_term, torch.where(valid, q * (gap_q + 1 - share * q * frame / mixture), 0.0)  # srkl


def _floored_mixture(student_part, teacher_part, objective, share, frame=1.0):
    """(frame m, log(frame m)) with m = share * first + (1 - share) * second (jsd, skl: first p;
    srkl: first q), the parts being frame q and frame p; m is floored at tiny on every path
    (log m = log(max(m, tiny))): it underflows where q and p both do."""
    first, second = (student_part, teacher_part) if objective == "srkl" else (teacher_part, student_part)
    mixture, tiny = share * first + (1 - share) * second, torch.finfo(torch.float32).tiny
    mixture = torch.clamp_min(mixture, tiny) if isinstance(frame, float) else torch.maximum(mixture, tiny * frame)
    return mixture, torch.log(mixture)


@fused_kernel
def divergence_second_pass(student, teacher, store, shifts, offsets, temperature, objective, share):
    """Pass 2 (tvd, jsd, skl, srkl): (sum f, sum h') [rows]; writes h' into `store` (fp32
    [rows, V], possibly a column slice of the buffer that becomes the gradient)."""
    zs, zt = accumulate(student), accumulate(teacher)
    valid = column_mask(zs, zt)
    log_q = _log_probs(zs, shifts, offsets, 0, temperature)
    log_p = _log_probs(zt, shifts, offsets, 1, temperature)
    q = torch.where(valid, torch.exp(log_q), 0.0)
    p = torch.where(valid, torch.exp(log_p), 0.0)
    mixture = log_ratios = None
    if objective != "tvd":
        mixture, log_m = _floored_mixture(q, p, objective, share)
        log_ratios = (log_q - log_m, log_p - log_m)
    loss, h_prime = _mixture_terms(q, p, valid, log_ratios, mixture, 1.0, objective, share)
    store.copy_(h_prime)
    return loss.sum(-1), h_prime.sum(-1)


@fused_kernel
def divergence_single_pass(student, teacher, store, temperature, objective, share):
    """Without tensor parallelism (fkl, tvd, jsd, skl, srkl): every pass and the gradient in one.

    Per row, in one loop over rows whose row-sized intermediates (e_s, e_t, ...) stay in
    Inductor's per-thread row buffers: maxima, e = exp(a) (two exps), Z = sum e, q = e_s / Z_s,
    p = e_t / Z_t, one log of Z_s m = share * first + (1 - share) * second scaled by Z_s
    (a per-row log of Z would split the loop, so log q - log m = a_s - log(Z_s m) and
    log p - log m = a_t - log(Z_s m) - C with C = log(Z_t / Z_s) left to the caller), f, h' and
    H = sum h'; writes the gradient up to its per-row factor, h' - q H, into `store`.
    Returns (maxima as divergence_first_pass, (Z_s, Z_t, sum f without the C term, H) [rows]).
    fkl: writes q - p; returns (maxima, (Z_s, Z_t, D, None)), D as divergence_first_pass.
    """
    valid, maxima, (a_s, a_t), (e_s, e_t) = _local_exps(student, teacher, temperature)
    total_s, total_t = e_s.sum(-1, keepdim=True), e_t.sum(-1, keepdim=True)
    safe_s, safe_t = torch.where(total_s > 0, total_s, 1.0), torch.where(total_t > 0, total_t, 1.0)
    q, p = e_s / safe_s, e_t / safe_t
    if objective == "fkl":
        store.copy_(q - p)
        moment = _moment(valid, a_s, a_t, e_s, e_t, objective)
        return maxima, (total_s.squeeze(-1), total_t.squeeze(-1), moment, None)
    scaled_mixture = log_ratios = None
    if objective != "tvd":
        scaled_mixture, log_scaled = _floored_mixture(e_s, e_t * (total_s / safe_t), objective, share, safe_s)
        log_ratios = (a_s - log_scaled, a_t - log_scaled)
    loss, h_prime = _mixture_terms(q, p, valid, log_ratios, scaled_mixture, safe_s, objective, share)
    h_total = h_prime.sum(-1, keepdim=True)
    store.copy_(h_prime - q * h_total)
    return maxima, (total_s.squeeze(-1), total_t.squeeze(-1), loss.sum(-1), h_total.squeeze(-1))


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
