"""Per-chunk passes of the KL-family losses (divergences.py has the math and the collectives).

Notation per row chunk, in each row's *local* frame (shifted by this rank's row maxima
sh = [max zs, max zt] over its real columns): a_s = (zs - sh_s) / tau, a_t = (zt - sh_t) / tau,
e_s = exp(a_s), e_t = exp(a_t). After the all-reduces every row has its log-normalisers in the
same local frame, c = [c_s, c_t], so that log q = a_s - c_s and log p = a_t - c_t exactly.

Columns that are -inf in either input ("masked", row_ops) are excluded. The fast path does not
look for them: a masked column makes a row's pass-1 statistics non-finite (an infinite log-ratio,
or 0 * inf), and only such rows are redone with an explicit column mask. Later passes zero the
masked columns of the rows recorded then.
"""
from __future__ import annotations

import torch

from .row_ops import chunk_row_maxima, valid_columns

ONE_PASS = ("fkl", "rkl")
"""Objectives whose loss follows from pass-1 moments; the others need a second pass (m = mixture)."""


def _shifted(workspace, name, logits, shift, temperature, rows):
    """(logits - shift) / tau into a workspace buffer (fp32 even for bf16 / fp16 logits)."""
    out = torch.sub(logits, shift.unsqueeze(-1), out=workspace.buffer(name, rows))
    return out if temperature == 1.0 else out.div_(temperature)


def first_pass_chunk(workspace, zs, zt, shifts, e_s_out, objective, temperature, valid=None):
    """Pass 1 on one chunk: writes e_s into `e_s_out` and returns [rows, 3] = [Z_s, Z_t, D].

    D = sum e_t (a_t - a_s) for fkl, sum e_s (a_s - a_t) for rkl; for the other objectives it is
    sum (a_s + a_t), kept only as a detector (any -inf / NaN column makes it non-finite).
    `valid` (a [rows, V] column mask, on the redo of masked rows) zeroes e_s, e_t and the
    log-ratio on invalid columns.
    """
    rows = zs.shape[0]
    a_s = _shifted(workspace, "a_s", zs, shifts[:, 0], temperature, rows)
    a_t = _shifted(workspace, "a_t", zt, shifts[:, 1], temperature, rows)
    e_s = torch.exp(a_s, out=e_s_out)
    e_t = torch.exp(a_t, out=workspace.buffer("e_t", rows))
    stats = torch.empty(rows, 3, dtype=e_s.dtype, device=e_s.device)
    if valid is not None:
        e_s.masked_fill_(~valid, 0.0)
        e_t.masked_fill_(~valid, 0.0)
    stats[:, 0] = e_s.sum(-1)
    stats[:, 1] = e_t.sum(-1)
    if objective in ONE_PASS:
        log_ratio = a_t.sub_(a_s) if objective == "fkl" else a_s.sub_(a_t)  # a_t - a_s or a_s - a_t
        if valid is not None:
            log_ratio.masked_fill_(~valid, 0.0)
        weight = e_t if objective == "fkl" else e_s
        stats[:, 2] = torch.linalg.vecdot(weight, log_ratio)
    elif valid is None:
        stats[:, 2] = a_s.sum(-1) + a_t.sum(-1)
    else:
        stats[:, 2] = 0.0
    return stats


def redo_masked_rows(workspace, zs, zt, e_s_out, objective, temperature):
    """Rows with masked (or NaN) columns: masked maxima (NaN / +inf kept), then pass 1 with the mask.

    Returns (shifts [rows, 2] with -inf replaced by 0, stats [rows, 3])."""
    maxima, _ = chunk_row_maxima(zs, zt, e_s_out.dtype)
    shifts = maxima.masked_fill(maxima == float("-inf"), 0.0)
    stats = first_pass_chunk(workspace, zs, zt, shifts, e_s_out, objective, temperature, valid_columns(zs, zt))
    return shifts, stats


def mask_rows_(tensor, zs, zt, masked_rows):
    """Zero the masked columns of the chunk's masked rows, in place."""
    if masked_rows.numel():
        valid = valid_columns(zs[masked_rows], zt[masked_rows])
        tensor[masked_rows] = torch.where(valid, tensor[masked_rows], 0.0)
    return tensor


def log_probs(workspace, name, logits, shift, offset, temperature, rows):
    """log of a softmax factor on a chunk: (z - sh) / tau - c, in one buffer."""
    out = _shifted(workspace, name, logits, shift, temperature, rows)
    return out.sub_(offset.unsqueeze(-1))


H_SCALE = {"jsd": lambda spec: 1 - spec.beta, "skl": lambda spec: -(1 - spec.skew), "srkl": lambda spec: 1.0}
"""h = H_SCALE * h' where h' is what pass 2 leaves in the buffer (tvd: see second_pass_chunk)."""


def second_pass_chunk(workspace, zs, zt, shifts, offsets, store, spec, masked_rows):
    """Pass 2 (tvd, jsd, skl, srkl) on one chunk; returns [rows, 2] = [sum f, sum h'].

    On entry `store` holds q (normalised student softmax; 0 on masked columns). It leaves holding
    h' = h / H_SCALE (jsd: q (log q - log m); skl: p q / m; srkl: q (log q - log m + 1 - a q / m)),
    so that the gradient is H_SCALE * (h' - q * sum h') / tau; tvd keeps q (s = sign(q - p) / 2
    cannot be recovered from q * s where q = p, so its backward recomputes p).
    log m is log(max(m, tiny)): where m underflows, p and q are below `tiny` too and their terms
    vanish either way, without log(0) = -inf meeting a zero weight.
    """
    rows = zs.shape[0]
    q = store
    log_p = log_probs(workspace, "a_t", zt, shifts[:, 1], offsets[:, 1], spec.temperature, rows)
    p = torch.exp(log_p, out=workspace.buffer("e_t", rows))
    name = spec.objective
    out = torch.empty(rows, 2, dtype=q.dtype, device=q.device)
    if name == "tvd":
        diff = torch.sub(q, p, out=workspace.buffer("term", rows))
        sign = torch.sign(diff, out=workspace.buffer("log_m", rows))
        out[:, 1] = 0.5 * torch.linalg.vecdot(q, sign)
        out[:, 0] = 0.5 * mask_rows_(diff.abs_(), zs, zt, masked_rows).sum(-1)
        return out
    share = spec.beta if name == "jsd" else spec.skew  # the first distribution's share of m
    # m = share * first + (1 - share) * second = lerp(second, first, share)
    first, second = (q, p) if name == "srkl" else (p, q)
    mixture = torch.lerp(second, first, share, out=workspace.buffer("term", rows)).clamp_min_(torch.finfo(q.dtype).tiny)
    log_m = torch.log(mixture, out=workspace.buffer("log_m", rows))
    if name in ("jsd", "skl"):  # sum p (log p - log m)
        teacher_term = torch.linalg.vecdot(p, mask_rows_(log_p.sub_(log_m), zs, zt, masked_rows))
    if name == "skl":  # f = p (log p - log m);  h' = p q / m
        out[:, 0] = teacher_term
        store.mul_(p).div_(mixture)
    else:
        log_q = log_probs(workspace, "a_s", zs, shifts[:, 0], offsets[:, 0], spec.temperature, rows)
        log_ratio = mask_rows_(log_q.sub_(log_m), zs, zt, masked_rows)  # log q - log m
        if name == "jsd":  # f = b p (log p - log m) + (1 - b) q (log q - log m);  h' = q (log q - log m)
            store.mul_(log_ratio)
        else:  # srkl: f = q (log q - log m);  h' = q (log q - log m + 1 - a q / m)
            out[:, 0] = torch.linalg.vecdot(q, log_ratio)
            log_ratio.add_(1.0).sub_(torch.div(q, mixture, out=mixture), alpha=share)
            store.mul_(log_ratio)
    mask_rows_(store, zs, zt, masked_rows)
    out[:, 1] = store.sum(-1)
    if name == "jsd":
        out[:, 0] = share * teacher_term + (1 - share) * out[:, 1]
    return out


def student_probs(workspace, zs, zt, shifts, offsets, temperature, masked_rows, out):
    """q = exp(log q) on a chunk, 0 on masked columns, into `out`."""
    log_q = log_probs(workspace, "a_s", zs, shifts[:, 0], offsets[:, 0], temperature, zs.shape[0])
    return mask_rows_(torch.exp(log_q, out=out), zs, zt, masked_rows)


def teacher_probs(workspace, zs, zt, shifts, offsets, temperature, masked_rows):
    """p = exp(log p) on a chunk, 0 on masked columns (a workspace buffer)."""
    log_p = log_probs(workspace, "a_t", zt, shifts[:, 1], offsets[:, 1], temperature, zt.shape[0])
    return mask_rows_(torch.exp(log_p, out=workspace.buffer("e_t", zt.shape[0])), zs, zt, masked_rows)

