"""KL-family baselines on vocab-parallel logits: fkl, rkl, jsd, skl, srkl, tvd.

p = softmax(zt / tau) (teacher), q = softmax(zs / tau) (student), both over the real, unmasked
vocabulary; no tau^2 factor. Each objective is a sum over the vocabulary of an elementwise term
f(p, q); its gradient through q's softmax is

    dL/dzs[k] = (h[k] - q[k] * sum_x h[x]) / tau,      h = q * df/dq

    fkl   KL(p||q)                        f = p (log p - log q)            h = -p
    rkl   KL(q||p)                        f = q (log q - log p)            h = q (log q - log p + 1)
    jsd   b KL(p||m) + (1-b) KL(q||m),    m = b p + (1-b) q,               h = (1-b) q (log q - log m)
    skl   KL(p||m),                       m = a p + (1-a) q,               h = -(1-a) p q / m
    srkl  KL(q||m),                       m = a q + (1-a) p,               h = q (log q - log m + 1) - a q^2 / m
    tvd   1/2 sum |p - q|                 f = |p - q| / 2                  h = q sign(q - p) / 2

Logs are taken from the logits (log p = zt/tau - logsumexp), and log m by logaddexp, so columns
whose probability underflows never produce inf * 0.

Passes and collectives (tensor-parallel group): pass 1 streams the logits once for the local
maxima and the softmax normalisers in the local-max frame; one MAX all-reduce of [max zs, max zt]
per token, after which the normalisers are rescaled exactly by exp((max_local - max) / tau); one
SUM all-reduce of [Z_s, Z_t]; pass 2 computes the terms; one SUM all-reduce of [sum f, sum h].
A row with NaN / +inf input (row_ops) is left out of the MAX and its [sum f, sum h] becomes NaN
before the last SUM, so its loss and gradient are NaN on every rank.
Backward needs no communication: it recomputes p, q and h chunk by chunk. Statistics are fp32
(fp64 for fp64 logits) whatever the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .row_ops import (accumulation_dtype, chunk_row_maxima, finish_maxima, invalid_rows, nan_where_loss_is_nan_,
                      row_chunks, safe_denominator, valid_columns, zero_empty_rows_)
from .vocab_shard import VocabShard

KL_FAMILY = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


@dataclass(frozen=True)
class DivergenceSpec:
    objective: str
    temperature: float
    skew: float
    beta: float


def _log_mixture(first_share, log_first, log_second):
    """log(a * exp(log_first) + (1 - a) * exp(log_second)) without overflow or log(0) traps."""
    log_a = math.log(first_share) if first_share > 0 else float("-inf")
    log_b = math.log1p(-first_share) if first_share < 1 else float("-inf")
    return torch.logaddexp(log_first + log_a, log_second + log_b)


def _terms(spec: DivergenceSpec, log_p, log_q):
    """Elementwise f, h (see module docstring) and q on one chunk; log_p may be overwritten."""
    q = log_q.exp()
    name = spec.objective
    if name == "fkl":
        p = log_p.exp()
        return p * (log_p - log_q), p.neg_(), q
    if name == "rkl":
        log_ratio = log_q - log_p
        f = q * log_ratio
        return f, log_ratio.add_(1).mul_(q), q
    if name == "jsd":
        beta = spec.beta
        p = log_p.exp()
        log_m = _log_mixture(beta, log_p, log_q)
        q_term = q * (log_q - log_m)
        return p.mul_(log_p.sub_(log_m)).mul_(beta).add_(q_term, alpha=1 - beta), q_term.mul_(1 - beta), q
    if name == "skl":
        log_m = _log_mixture(spec.skew, log_p, log_q)
        f = log_p.exp() * (log_p - log_m)
        return f, log_p.add_(log_q).sub_(log_m).exp_().mul_(-(1 - spec.skew)), q
    if name == "srkl":
        log_m = _log_mixture(spec.skew, log_q, log_p)
        log_ratio = log_q - log_m
        f = q * log_ratio
        h = log_ratio.add_(1).mul_(q).sub_((2 * log_q - log_m).exp_().mul_(spec.skew))
        return f, h, q
    if name == "tvd":
        diff = q - log_p.exp_()
        return diff.abs().mul_(0.5), torch.sign(diff).mul_(q).mul_(0.5), q
    raise AssertionError(f"unhandled objective {name}")


def _chunk_log_probs(zs, zt, maxima, log_norms, temperature, masked_rows):
    """log q, log p on a chunk (fp32); invalid columns of masked rows become -inf."""
    log_q = (zs - maxima[:, 0:1]).div_(temperature).sub_(log_norms[:, 0:1])
    log_p = (zt - maxima[:, 1:2]).div_(temperature).sub_(log_norms[:, 1:2])
    if masked_rows.numel():
        valid = valid_columns(zs[masked_rows], zt[masked_rows])
        log_q[masked_rows] = torch.where(valid, log_q[masked_rows], float("-inf"))
        log_p[masked_rows] = torch.where(valid, log_p[masked_rows], float("-inf"))
    return log_p, log_q


def _zero_invalid(tensor, zs, zt, masked_rows):
    if masked_rows.numel():
        valid = valid_columns(zs[masked_rows], zt[masked_rows])
        tensor[masked_rows] = torch.where(valid, tensor[masked_rows], 0.0)
    return tensor


class _DivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, spec: DivergenceSpec, shard: VocabShard):
        rows, width = student.shape[0], shard.valid_width
        dtype = accumulation_dtype(student.dtype)
        zs, zt = student[:, :width], teacher[:, :width]
        tau = spec.temperature
        # Pass 1: per-row local maxima and softmax normalisers in the local-max frame.
        local_shifts = torch.zeros(rows, 2, dtype=dtype, device=student.device)
        norms = torch.zeros(rows, 2, dtype=dtype, device=student.device)
        masked = torch.zeros(rows, dtype=torch.bool, device=student.device)
        zero_log_norms = torch.zeros_like(norms)
        chunks = list(row_chunks(rows, width)) if width else []
        for start, end in chunks:
            chunk_maxima, masked_rows = chunk_row_maxima(zs[start:end], zt[start:end], dtype)
            masked[start + masked_rows] = True
            local_shifts[start:end] = chunk_maxima
            finite_shifts = chunk_maxima.masked_fill(chunk_maxima == float("-inf"), 0.0)
            log_p, log_q = _chunk_log_probs(zs[start:end], zt[start:end], finite_shifts,
                                            zero_log_norms[start:end], tau, masked_rows)
            norms[start:end, 0] = log_q.exp_().sum(-1)
            norms[start:end, 1] = log_p.exp_().sum(-1)
        invalid = invalid_rows(local_shifts)  # NaN / +inf input: kept out of the MAX, poisons the SUM
        maxima = local_shifts.masked_fill(invalid.unsqueeze(-1), float("-inf"))
        shard.all_reduce_max(maxima)
        empty = finish_maxima(maxima)
        # exp((z - max_loc) / tau) -> exp((z - max) / tau): scale by exp((max_loc - max) / tau) <= 1.
        rescale = ((local_shifts - maxima) / tau).exp_().nan_to_num_(0.0)
        norms.mul_(torch.where(local_shifts == float("-inf"), torch.zeros_like(rescale), rescale))
        shard.all_reduce_sum(norms)
        log_norms = safe_denominator(norms).log_()

        sums = torch.zeros(rows, 2, dtype=maxima.dtype, device=student.device)  # [sum f, sum h]
        for start, end in chunks:
            masked_rows = masked[start:end].nonzero().squeeze(-1)
            log_p, log_q = _chunk_log_probs(zs[start:end], zt[start:end], maxima[start:end],
                                            log_norms[start:end], tau, masked_rows)
            f, h, _ = _terms(spec, log_p, log_q)
            sums[start:end, 0] = _zero_invalid(f, zs[start:end], zt[start:end], masked_rows).sum(-1)
            sums[start:end, 1] = _zero_invalid(h, zs[start:end], zt[start:end], masked_rows).sum(-1)
        sums[invalid] = float("nan")
        shard.all_reduce_sum(sums)
        zero_empty_rows_(sums, empty)

        ctx.save_for_backward(student, teacher, maxima, masked, log_norms, sums[:, 1].clone(), sums[:, 0].isnan())
        ctx.spec, ctx.shard = spec, shard
        return sums[:, 0].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, maxima, masked, log_norms, h_total, loss_is_nan = ctx.saved_tensors
        spec, shard = ctx.spec, ctx.shard
        rows, width = student.shape[0], shard.valid_width
        grad = torch.zeros_like(student, memory_format=torch.contiguous_format)
        zs, zt = student[:, :width], teacher[:, :width]
        row_coeff = nan_where_loss_is_nan_(grad_loss.to(maxima.dtype) / spec.temperature, loss_is_nan)
        for start, end in (row_chunks(rows, width) if width else []):
            masked_rows = masked[start:end].nonzero().squeeze(-1)
            log_p, log_q = _chunk_log_probs(zs[start:end], zt[start:end], maxima[start:end],
                                            log_norms[start:end], spec.temperature, masked_rows)
            _, h, q = _terms(spec, log_p, log_q)
            chunk_grad = h.sub_(q.mul_(h_total[start:end].unsqueeze(-1)))
            chunk_grad = _zero_invalid(chunk_grad, zs[start:end], zt[start:end], masked_rows)
            grad[start:end, :width] = chunk_grad.mul_(row_coeff[start:end].unsqueeze(-1))
        return grad, None, None, None


def divergence_loss(student, teacher, spec: DivergenceSpec, shard: VocabShard) -> torch.Tensor:
    """Per-row KL-family loss of 2-D `[rows, V_local]` logits (inputs already validated)."""
    return _DivergenceFunction.apply(student, teacher.detach(), spec, shard)
