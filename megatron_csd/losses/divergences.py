"""KL-family baselines on vocab-parallel logits: fkl, rkl, jsd, skl, srkl, tvd.

p = softmax(zt / tau) (teacher), q = softmax(zs / tau) (student), both over the real, unmasked
vocabulary; no tau^2 factor. Each objective is a sum over the vocabulary of an elementwise term
f(p, q); its gradient through q's softmax is

    dL/dzs[k] = (h[k] - q[k] * sum_x h[x]) / tau = q[k] (s[k] - sum_x q[x] s[x]) / tau,   h = q s

    fkl   KL(p||q)                        f = p (log p - log q)            h = -p
    rkl   KL(q||p)                        f = q (log q - log p)            s = log q - log p + 1
    jsd   b KL(p||m) + (1-b) KL(q||m),    m = b p + (1-b) q,               s = (1-b) (log q - log m)
    skl   KL(p||m),                       m = a p + (1-a) q,               s = -(1-a) p / m
    srkl  KL(q||m),                       m = a q + (1-a) p,               s = log q - log m + 1 - a q / m
    tvd   1/2 sum |p - q|                 f = |p - q| / 2                  s = sign(q - p) / 2

Logs of p and q come from the logits (log q = a_s - c_s in each row's local frame, see
divergence_passes.py), never from log(exp(.)), and log m = log(max(m, tiny)).

Passes (row chunks that stay in cache) and collectives (tensor-parallel group):
  pass 1 streams both inputs once: local maxima sh, e_s = exp(a_s) written into the buffer that
    becomes the gradient, Z_s = sum e_s, Z_t = sum e_t and, for fkl / rkl, the local moment
    D = sum e_t (a_t - a_s) (fkl) or sum e_s (a_s - a_t) (rkl);
  MAX all-reduce of [max zs, max zt] ([tokens, 2]); every local statistic moves to the global
    frame exactly (times exp((sh - max) / tau) <= 1); SUM all-reduce of [Z_s, Z_t];
  fkl / rkl: the loss is a per-row function of the moments; per shard k (P_k, Q_k its mass under
    p, q):  fkl_k = D_k / Z_t + P_k (c_s - c_t),   rkl_k = D_k / Z_s + Q_k (c_t - c_s);
  tvd / jsd / skl / srkl: pass 2 normalises the buffer to q, recomputes p (one exp) and log m
    (one log), sums f and h = q s, and leaves h' = h / H_SCALE in the buffer (tvd: q);
  SUM all-reduce of the per-row [loss, sum h] shards.
A row with NaN / +inf input (row_ops) is left out of the MAX and its last SUM slot becomes NaN,
so its loss and gradient are NaN on every rank.
Backward, no communication, one pass: fkl q - p (one exp for p); rkl from the buffer and the
logits (no exp); tvd recomputes p (one exp); jsd / skl / srkl recompute q (one exp). Memory: the
one fp32 [tokens, V_local] buffer (the gradient itself for fp32 logits) plus chunk-sized scratch.
A second backward through the same graph (retain_graph) recomputes the buffer. Statistics are
fp32 (fp64 for fp64 logits) whatever the input dtype.
Large CPU inputs run the passes as fused compiled kernels (divergence_kernels.py,
compiled.use_compiled). Under tensor parallelism pass 1 of tvd / jsd / skl / srkl writes nothing,
pass 2 computes q from the logits (one more exp) and writes h' (tvd: q sign(q - p) / 2) into the
buffer, and the backward recomputes q only. Without it (no collective between the passes) one
kernel does every pass and the gradient's row sum per row, in cache: two exps and one log per
element in all (fkl, tvd: no log), the buffer holds the gradient up to its per-row factor
(fkl: q - p; the others: h' - q sum h'), and the backward only scales it. rkl keeps its passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .compiled import shifts_of, use_compiled
from .divergence_kernels import (divergence_first_pass, divergence_gradient, divergence_second_pass,
                                 divergence_single_pass)
from .divergence_passes import (H_SCALE, ONE_PASS, first_pass_chunk, mask_rows_, redo_masked_rows, second_pass_chunk,
                                student_probs, teacher_probs)
from .row_ops import (accumulation_dtype, difference_into, finish_maxima, for_each_chunk, invalid_rows,
                      nan_where_loss_is_nan_, safe_denominator, zero_empty_rows_)
from .vocab_shard import VocabShard

KL_FAMILY = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


@dataclass(frozen=True)
class DivergenceSpec:
    objective: str
    temperature: float
    skew: float
    beta: float


def _first_pass(zs, zt, store, spec):
    """Pass 1 over every chunk: (local shifts [rows, 2], stats [rows, 3], masked [rows] bool)."""
    rows, dtype = zs.shape[0], store.dtype
    shifts = torch.zeros(rows, 2, dtype=dtype, device=zs.device)
    stats = torch.zeros(rows, 3, dtype=dtype, device=zs.device)
    masked = torch.zeros(rows, dtype=torch.bool, device=zs.device)

    def chunk(start, end, workspace):
        shifts[start:end, 0] = zs[start:end].amax(-1)
        shifts[start:end, 1] = zt[start:end].amax(-1)
        stats[start:end] = first_pass_chunk(workspace, zs[start:end], zt[start:end], shifts[start:end],
                                            store[start:end], spec.objective, spec.temperature)
        redo = (~torch.isfinite(stats[start:end]).all(-1)).nonzero().squeeze(-1)
        if redo.numel():
            ids = start + redo
            masked[ids] = True
            e_s = torch.empty(ids.numel(), zs.shape[1], dtype=dtype, device=zs.device)
            shifts[ids], stats[ids] = redo_masked_rows(workspace, zs[ids], zt[ids], e_s, spec.objective,
                                                       spec.temperature)
            store[ids] = e_s

    for_each_chunk(rows, zs.shape[1], chunk, dtype, zs.device)
    return shifts, stats, masked


def _normalisers(shifts, stats, shard, temperature):
    """MAX and SUM all-reduces: per row (present, empty, invalid, rescaled local stats, Z, c, r).

    c = [c_s, c_t]: log-normalisers in the row's local frame (log q = a_s - c_s); r = exp(-c) (0
    where this rank holds no valid column of the row), so that q = e_s * r_s."""
    invalid = invalid_rows(shifts)  # NaN / +inf input: kept out of the MAX, poisons the last SUM
    present = (stats[:, 0] > 0) & ~invalid
    maxima = torch.where(present.unsqueeze(-1), shifts, torch.full_like(shifts, float("-inf")))
    shard.all_reduce_max(maxima)
    empty = finish_maxima(maxima)
    log_rescale = (shifts - maxima) / temperature
    rescale = torch.where(present.unsqueeze(-1), log_rescale.exp(), torch.zeros_like(log_rescale))
    local = stats[:, :2] * rescale
    totals = shard.all_reduce_sum(local.clone())
    safe = safe_denominator(totals)
    offsets = torch.where(present.unsqueeze(-1), safe.log() - log_rescale, torch.zeros_like(safe))
    scales = torch.where(present.unsqueeze(-1), rescale / safe, torch.zeros_like(safe))
    return invalid, present, empty, local, safe, offsets, scales


class _DivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, spec: DivergenceSpec, shard: VocabShard):
        rows, width = student.shape[0], shard.valid_width
        dtype = accumulation_dtype(student.dtype)
        zs, zt = student[:, :width], teacher[:, :width]
        in_place = student.dtype == dtype  # the buffer becomes the gradient
        compiled = use_compiled(student, width)
        padding = student.shape[1] - width if in_place else 0
        single = compiled and one_kernel(spec, shard)
        if single:  # one fused kernel: the statistics and the gradient up to its per-row factor
            store, shifts, stats, single_sums = _compiled_single_pass(zs, zt, padding, spec)
            masked = None
        elif compiled:  # the same statistics from fused kernels (divergence_kernels.py)
            store, shifts, stats = _compiled_first_pass(zs, zt, padding, spec)
            masked = None  # the kernels mask columns inline
        else:
            store = torch.empty(rows, student.shape[1] if in_place else width, dtype=dtype, device=student.device)
            shifts, stats, masked = _first_pass(zs, zt, store[:, :width], spec)
        invalid, present, empty, local, totals, offsets, scales = _normalisers(shifts, stats, shard, spec.temperature)
        sums = torch.zeros(rows, 2, dtype=dtype, device=student.device)  # this shard's [loss, sum h]
        if spec.objective in ONE_PASS:
            weight = 1 if spec.objective == "fkl" else 0  # D is weighted by e_t (fkl) or e_s (rkl)
            mass = local[:, weight] / totals[:, weight]
            log_gap = offsets[:, 0] - offsets[:, 1] if weight else offsets[:, 1] - offsets[:, 0]
            sums[:, 0] = torch.where(present, scales[:, weight] * stats[:, 2] + mass * log_gap, 0.0)
        elif single:  # the kernel's sum f lacks -C sum p (C = c_t - c_s, sum p = 1)
            sums[:, 0] = single_sums[0] - _teacher_share(spec) * (offsets[:, 1] - offsets[:, 0])
            sums[:, 1] = single_sums[1]
            sums.masked_fill_(~present.unsqueeze(-1), 0.0)
        elif compiled:  # pass 2 writes the store: h'
            store, (sums[:, 0], sums[:, 1]) = _compiled_second_pass(zs, zt, padding, shifts, offsets, spec)
            sums.masked_fill_(~present.unsqueeze(-1), 0.0)
        else:
            def second_pass(start, end, workspace):
                chunk = store[start:end, :width].mul_(scales[start:end, 0:1])  # e_s -> q
                sums[start:end] = second_pass_chunk(workspace, zs[start:end], zt[start:end], shifts[start:end],
                                                    offsets[start:end], chunk, spec,
                                                    masked[start:end].nonzero().squeeze(-1))

            for_each_chunk(rows, width, second_pass, dtype, student.device)
            sums.masked_fill_(~present.unsqueeze(-1), 0.0)
        sums[invalid] = float("nan")
        shard.all_reduce_sum(sums)
        zero_empty_rows_(sums, empty)
        loss = sums[:, 0].clone()
        ctx.save_for_backward(student, teacher, shifts, offsets, scales, masked, sums[:, 1].clone(), loss)
        ctx.spec, ctx.shard, ctx.store, ctx.compiled, ctx.single = spec, shard, store, compiled, single
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        student, teacher, shifts, offsets, scales, masked, h_total, loss = ctx.saved_tensors
        spec, shard = ctx.spec, ctx.shard
        store, ctx.store = ctx.store, None  # consumed: a second backward recomputes it
        rows, width = student.shape[0], shard.valid_width
        dtype, tau = shifts.dtype, spec.temperature
        in_place = store is not None and store.shape == student.shape
        grad = store if in_place else torch.empty_like(student, memory_format=torch.contiguous_format)
        if width < student.shape[1]:
            grad[:, width:] = 0
        if width == 0:
            return grad, None, None, None
        zs, zt = student[:, :width], teacher[:, :width]
        if store is None and ctx.single:  # the store again, from the kernel that wrote it
            store = _compiled_single_pass(zs, zt, 0, spec)[0]
        elif store is None and ctx.compiled:
            store = _compiled_store(zs, zt, shifts, offsets, spec)
        elif store is None:
            store = _recompute_store(student, teacher, shifts, offsets, scales, masked, spec, width)
        row_coeff = nan_where_loss_is_nan_(grad_loss.to(dtype) / tau, loss.isnan())
        if ctx.single:  # the store holds q - p (fkl) or h' - q sum h'
            factor = (row_coeff * _h_scale(spec)).unsqueeze(-1)
            torch.mul(store[:, :width], factor, out=grad[:, :width])
            return grad, None, None, None
        if ctx.compiled:
            _compiled_gradient(zs, zt, store[:, :width], None if in_place else grad[:, :width], shifts, offsets,
                               scales, h_total, loss, row_coeff, spec)
            return grad, None, None, None

        def chunk_grad(start, end, workspace):
            chunk_rows = masked[start:end].nonzero().squeeze(-1)
            args = (workspace, zs[start:end], zt[start:end], shifts[start:end], offsets[start:end])
            coeff = row_coeff[start:end].unsqueeze(-1)
            buffer = store[start:end, :width]
            if spec.objective == "fkl":  # (q - p) / tau; the buffer holds e_s
                p = teacher_probs(*args, tau, chunk_rows)
                chunk = buffer.mul_(scales[start:end, 0:1]).sub_(p).mul_(coeff)
            elif spec.objective == "rkl":  # q (log q - log p - rkl) / tau; the buffer holds e_s
                log_ratio = difference_into(workspace.buffer("a_s", end - start), zs[start:end], zt[start:end])
                constant = (shifts[start:end, 1] - shifts[start:end, 0]) + tau * (
                    offsets[start:end, 1] - offsets[start:end, 0] - loss[start:end])
                log_ratio.add_(constant.unsqueeze(-1))
                factor = scales[start:end, 0:1] * coeff / tau
                chunk = mask_rows_(buffer.mul_(log_ratio), zs[start:end], zt[start:end], chunk_rows).mul_(factor)
            elif spec.objective == "tvd":  # q (sign(q - p) / 2 - H) / tau; the buffer holds q
                p = teacher_probs(*args, tau, chunk_rows)
                sign = torch.sub(buffer, p, out=p).sign_().mul_(0.5).sub_(h_total[start:end].unsqueeze(-1))
                chunk = buffer.mul_(sign).mul_(coeff)
            else:  # H_SCALE (h' - q sum h') / tau; the buffer holds h'
                q = student_probs(*args, tau, chunk_rows, workspace.buffer("e_t", end - start))
                q.mul_(h_total[start:end].unsqueeze(-1))
                chunk = buffer.sub_(q).mul_(coeff * H_SCALE[spec.objective](spec))
            if not in_place:
                grad[start:end, :width] = chunk

        for_each_chunk(rows, width, chunk_grad, dtype, student.device)
        return grad, None, None, None


def _recompute_store(student, teacher, shifts, offsets, scales, masked, spec, width):
    """The buffer as the forward left it, for a second backward (retain_graph)."""
    dtype = shifts.dtype
    zs, zt = student[:, :width], teacher[:, :width]
    store = torch.empty(student.shape[0], width, dtype=dtype, device=student.device)

    def chunk_store(start, end, workspace):
        chunk_rows = masked[start:end].nonzero().squeeze(-1)
        args = (workspace, zs[start:end], zt[start:end], shifts[start:end], offsets[start:end])
        chunk = store[start:end]
        # e_s exactly as pass 1 wrote it, then (tvd, jsd, skl, srkl) q and s exactly as pass 2 did
        student_probs(*args[:4], torch.zeros_like(offsets[start:end]), spec.temperature, chunk_rows, chunk)
        if spec.objective not in ONE_PASS:
            chunk.mul_(scales[start:end, 0:1])
            if spec.objective != "tvd":
                second_pass_chunk(*args, chunk, spec, chunk_rows)

    for_each_chunk(student.shape[0], width, chunk_store, dtype, student.device)
    return store


def _h_scale(spec):
    """h / h' (divergence_passes.H_SCALE; 1 for tvd, whose store holds h itself)."""
    return H_SCALE[spec.objective](spec) if spec.objective in H_SCALE else 1.0


def _share(spec):
    """The first distribution's share of the mixture m (jsd: beta; skl, srkl: skew)."""
    return spec.beta if spec.objective == "jsd" else spec.skew


def _padded_store(zs, padding):
    """fp32 [rows, width + padding] for a kernel to fill (its first `width` columns); the padding
    columns are 0 (the store becomes the gradient of fp32 logits)."""
    store = torch.empty(zs.shape[0], zs.shape[1] + padding, dtype=torch.float32, device=zs.device)
    store[:, zs.shape[1]:] = 0
    return store


def one_kernel(spec, shard):
    """Whether the compiled path runs divergence_single_pass (every objective but rkl, at TP 1):
    with tensor parallelism the passes need the all-reduces between them; rkl's gradient needs its
    loss, a per-row log that would split the kernel's loop (and its backward has no exp anyway)."""
    return not shard.distributed and spec.objective != "rkl"


def _teacher_share(spec):
    """Weight of sum p (log p - log m) in a mixture objective's loss (tvd, srkl: none)."""
    return {"jsd": spec.beta, "skl": 1.0}.get(spec.objective, 0.0)


def _compiled_single_pass(zs, zt, padding, spec):
    """The single fused kernel (no tensor parallelism; not rkl): (store [rows, width + padding],
    shifts [rows, 2], stats [rows, 3], (sum f without C, sum h') [rows] or None for fkl). The store
    holds the gradient up to its per-row factor: q - p (fkl), h' - q sum h' (the others)."""
    store = _padded_store(zs, padding)
    maxima, (total_s, total_t, loss, h_total) = divergence_single_pass(
        zs, zt, store[:, :zs.shape[1]], spec.temperature, spec.objective, _share(spec))
    if spec.objective == "fkl":  # loss is pass 1's moment D
        stats = torch.stack((total_s, total_t, loss), dim=-1)
        return store, shifts_of(maxima), stats, None
    stats = torch.stack((total_s, total_t, torch.zeros_like(total_s)), dim=-1)
    return store, shifts_of(maxima), stats, (loss, h_total)


def _compiled_first_pass(zs, zt, padding, spec):
    """Pass 1 by the fused kernel: (store [rows, width + padding] (fkl / rkl: e_s; otherwise None),
    shifts [rows, 2], stats [rows, 3])."""
    store = _padded_store(zs, padding) if spec.objective in ONE_PASS else None
    maxima, (total_s, total_t, moment) = divergence_first_pass(
        zs, zt, None if store is None else store[:, :zs.shape[1]], spec.temperature, spec.objective)
    shifts = shifts_of(maxima)
    stats = torch.stack((total_s, total_t, torch.zeros_like(total_s) if moment is None else moment), dim=-1)
    return store, shifts, stats


def _compiled_second_pass(zs, zt, padding, shifts, offsets, spec):
    """Pass 2 by the fused kernel (tvd, jsd, skl, srkl): (store h' [rows, width + padding],
    (sum f, sum h') [rows])."""
    store = _padded_store(zs, padding)
    sums = divergence_second_pass(zs, zt, store[:, :zs.shape[1]], shifts, offsets, spec.temperature,
                                  spec.objective, _share(spec))
    return store, sums


def _compiled_store(zs, zt, shifts, offsets, spec):
    """The store as the forward's kernels left it, for a second backward (retain_graph)."""
    if spec.objective in ONE_PASS:
        return _compiled_first_pass(zs, zt, 0, spec)[0]
    return _compiled_second_pass(zs, zt, 0, shifts, offsets, spec)[0]


def _compiled_gradient(zs, zt, store, out, shifts, offsets, scales, h_total, loss, row_coeff, spec):
    """The backward by the fused kernel (`store`: e_s for fkl / rkl, h' otherwise), with each
    objective's per-row term."""
    tau, name = spec.temperature, spec.objective
    row_term = h_total
    if name == "rkl":
        row_term = (shifts[:, 1] - shifts[:, 0]) + tau * (offsets[:, 1] - offsets[:, 0] - loss)
    divergence_gradient(zs, zt, store, out, shifts, offsets, scales[:, 0], row_term, row_coeff, tau, name,
                        _h_scale(spec))


def divergence_loss(student, teacher, spec: DivergenceSpec, shard: VocabShard) -> torch.Tensor:
    """Per-row KL-family loss of 2-D `[rows, V_local]` logits (inputs already validated)."""
    return _DivergenceFunction.apply(student, teacher.detach(), spec, shard)
