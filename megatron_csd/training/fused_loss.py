"""Fused vocab-parallel output layer + distillation loss: never materialise the full logits.

The last pipeline stage gets, per model, the final hidden states H (after the final norm,
``[N, h]`` for N = s * b tokens once gathered) and the output weight shard W (``[V_pad/TP, h]``,
the word embedding when the heads are tied). Instead of ``Z = H W^T`` for all N tokens
(``[N, V/TP]`` per model, plus the loss's stored softmax, its gradient and an fp32 CE copy), the
tokens are processed in chunks of c rows (one fp32 ``[c, V/TP]`` buffer <= ``CHUNK_BYTES``):

    Zs_c = Hs_c Ws^T,  Zt_c = Ht_c Wt^T                      (param dtype, as the output layer)
    kd_c = distillation_loss(Zs_c, Zt_c)                     (losses/: the same per-token
    ce_c = response CE(Zs_c) (Megatron's, kd_ratio < 1)       statistics, MAX / SUM all-reduces)
    loss_c = sum_t mask[t] (kd_ratio kd[t] + (1 - kd_ratio) ce[t])
    G_c = d loss_c / d Zs_c                                  (the losses' own backward)
    dHs_c = G_c Ws,  dWs += G_c^T Hs_c                       (fp32 accumulators)

Every statistic is per token, so a chunk of tokens gives exactly the unfused per-token values
(the losses are called on each chunk as they are on the whole microbatch). Each chunk issues
the same collectives as today's losses on its rows; the backward issues none of its own. CEs
that are only logged (the student's at kd_ratio 1, the teacher's in evaluation) accumulate
local statistics per chunk (``losses.chunked_ce``) and reduce once per call (one MAX, one SUM).

Gradient during the forward (as Liger-Kernel does), not recomputed in the backward: the loss is
``sum mask * per_token`` and its only upstream gradient is the schedule's scalar (1, or the fp16
loss scale), so dHs and dWs are computed for an upstream gradient of 1 while the chunk's logits
exist and multiplied by the scalar in the backward. Measured, not assumed: a chunk-wise
recompute in the backward would redo both logit GEMMs and the loss forward on top of this same
work; on the CPU benchmark (``tools/bench_loss.py --fused``, key ``forward_only_ms``, a loaded
2-core machine) that forward alone took 0.4-1.4x of the whole fused step (which itself took
0.5-0.95x of the unfused step), so recomputing would add that much time to save only what the
forward gradient costs in memory: two small fp32 accumulators, ``[N, h]`` and ``[V/TP, h]``,
held from the forward to the backward.

Weight gradient: when Megatron's DDP gave the weight a ``main_grad`` buffer, dWs (times the
scalar) is added to it in fp32 and a zero ``.grad`` is returned, so the DDP hook still fires
(bucket readiness) and still adds any other gradient of the same parameter (the tied embedding
lookup at PP 1) — ``grad_added_to_main_grad`` is left untouched for that reason. At PP > 1 the
last stage's copy of a tied embedding receives its gradient in ``main_grad`` like any other
parameter, and ``finalize_model_grads`` all-reduces it with the first stage's as before. Without
``main_grad`` the gradient is returned as ``.grad`` in the weight's dtype.

Layouts: under sequence parallelism the hidden states arrive ``[s/TP, b, h]`` and are gathered
with Megatron's ``gather_from_sequence_parallel_region`` (reduce-scatter of dH in the backward),
otherwise ``copy_to_tensor_model_parallel_region`` (all-reduce of dH) — what ColumnParallelLinear
does. dtypes: logits and GEMMs in the param dtype (fp32 / bf16); for fp16 the loss sees fp32
logits (exact upcast; the statistics are fp32 anyway) so that the unscaled gradient cannot
underflow before the loss scale is applied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from megatron_csd.losses.chunked_ce import ChunkedCrossEntropy
from megatron_csd.losses.vocab_shard import describe_shard

CHUNK_BYTES = 1 << 28
"""Budget of one fp32 ``[chunk tokens, V/TP]`` buffer (256 MiB: 524 tokens at V/TP = 128000)."""


class FusedStats(NamedTuple):
    """Detached per-token values in the token order of the hidden states (``[s * b]``)."""

    per_token: torch.Tensor              # the optimised loss
    kd: Optional[torch.Tensor]           # distillation term (distill mode)
    ce: torch.Tensor                     # student response CE
    teacher_ce: Optional[torch.Tensor]   # teacher response CE (evaluation, distill mode)


@dataclass
class _Plan:
    spec: object                          # training.objective.ObjectiveSpec
    evaluating: bool
    chunk_tokens: int
    stats: Optional[FusedStats] = None    # filled by the forward


def chunk_tokens_for(local_vocab: int, num_tokens: int, chunk_bytes: Optional[int] = None) -> int:
    """Tokens per chunk so that one fp32 ``[chunk, local_vocab]`` buffer fits ``chunk_bytes``."""
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(num_tokens, budget // (4 * max(local_vocab, 1))))


def _masked_sum(values, mask):
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def _chunk_losses(zs, zt, labels, mask, spec, want_grad: bool):
    """Per-token losses of one token chunk and ``d sum(mask * loss) / d zs`` (or None).

    ``ce`` is None when the CE is only logged (kd_ratio 1): the caller accumulates it."""
    from megatron_csd.losses import distillation_loss
    from megatron_csd.training.objective import response_cross_entropy

    leaf = zs.detach().requires_grad_(want_grad)
    kd = ce = grad = None
    with torch.set_grad_enabled(want_grad):
        if spec.distill:
            kd = distillation_loss(leaf, zt, spec.loss_config,
                                   tp_group=spec.tp_group if spec.tp_size > 1 else None,
                                   vocab_size=spec.vocab_size)
            per_token = kd
            if spec.kd_ratio < 1.0:
                ce = response_cross_entropy(leaf, labels, spec)
                per_token = spec.kd_ratio * kd + (1.0 - spec.kd_ratio) * ce
        else:
            ce = per_token = response_cross_entropy(leaf, labels, spec)
        if want_grad:
            (grad,) = torch.autograd.grad(_masked_sum(per_token, mask), leaf)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return FusedStats(per_token.detach(), detach(kd), detach(ce), None), grad


def _cat(parts):
    return None if parts[0] is None else torch.cat(parts)


def _run_chunks(hidden, weight, teacher_hidden, teacher_weight, labels, mask, plan: _Plan, want_grad: bool):
    """The chunk loop; returns (stats, dH fp32 or None, dW fp32 or None) for upstream gradient 1."""
    num_tokens = hidden.shape[0]
    upcast = want_grad and hidden.dtype == torch.float16
    weight_fp32 = weight.detach().float() if upcast else None  # one copy, not one per chunk
    grad_hidden = grad_weight = None
    if want_grad:
        grad_hidden = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        if weight.requires_grad:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    spec = plan.spec
    # Logged CEs (student when kd_ratio is 1, teacher in evaluation): two all-reduces per call.
    shard = describe_shard(weight.shape[0], spec.tp_group if spec.tp_size > 1 else None, spec.vocab_size)
    logged_ce = (ChunkedCrossEntropy(num_tokens, shard, hidden.dtype, hidden.device)
                 if spec.distill and spec.kd_ratio == 1.0 else None)
    teacher_ce = (ChunkedCrossEntropy(num_tokens, shard, hidden.dtype, hidden.device)
                  if plan.evaluating and spec.distill else None)
    parts = []
    for start in range(0, num_tokens, plan.chunk_tokens):
        end = min(start + plan.chunk_tokens, num_tokens)
        rows = hidden[start:end]
        zs = torch.matmul(rows, weight.t())
        zt = None if teacher_hidden is None else torch.matmul(teacher_hidden[start:end], teacher_weight.t())
        if upcast:
            zs, zt = zs.float(), (None if zt is None else zt.float())
        stats, grad = _chunk_losses(zs, zt, labels[start:end], mask[start:end], spec, want_grad)
        if logged_ce is not None:
            logged_ce.add(start, zs, labels[start:end])
        if teacher_ce is not None:
            teacher_ce.add(start, zt, labels[start:end])
        del zs, zt
        parts.append(stats)
        if grad is None:
            continue
        if upcast:  # fp16: keep the unscaled gradient in fp32 through both GEMMs
            grad_hidden[start:end] = torch.matmul(grad, weight_fp32)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), rows.float())
        else:
            grad = grad.to(weight.dtype)
            grad_hidden[start:end] = torch.matmul(grad, weight)
            if grad_weight is not None:
                if grad_weight.dtype == grad.dtype:
                    grad_weight.addmm_(grad.t(), rows)
                else:
                    grad_weight.add_(torch.matmul(grad.t(), rows))
        del grad
    stats = FusedStats(*(_cat([getattr(p, name) for p in parts]) for name in FusedStats._fields))
    stats = stats._replace(ce=logged_ce.finish() if logged_ce is not None else stats.ce,
                           teacher_ce=teacher_ce.finish() if teacher_ce is not None else None)
    return stats, grad_hidden, grad_weight


class _FusedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, mask, plan: _Plan):
        stats, grad_hidden, grad_weight = _run_chunks(hidden, weight, teacher_hidden, teacher_weight,
                                                      labels, mask, plan, want_grad=True)
        plan.stats = stats
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight, ctx.hidden_dtype = weight, hidden.dtype
        return _masked_sum(stats.per_token, mask)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        weight, ctx.weight = ctx.weight, None
        scale = grad_loss.to(torch.float32)
        out_hidden = grad_hidden.mul_(scale).to(ctx.hidden_dtype)
        out_weight = None
        if grad_weight is not None:
            grad_weight.mul_(scale)
            main_grad = getattr(weight, "main_grad", None)
            if main_grad is not None:
                main_grad.add_(grad_weight)
                out_weight = torch.zeros_like(weight)  # fires DDP's hook; adds nothing
            else:
                out_weight = grad_weight.to(weight.dtype)
        return out_hidden, out_weight, None, None, None, None, None


def _gather_hidden(head, spec):
    """[s, b, h] hidden states of all sequence positions, as ColumnParallelLinear's input."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    if spec.tp_size == 1:
        return head.hidden
    group = head.tp_group if head.tp_group is not None else spec.tp_group
    if head.sequence_parallel:
        return gather_from_sequence_parallel_region(head.hidden, tensor_parallel_output_grad=True, group=group)
    return copy_to_tensor_model_parallel_region(head.hidden, group=group)


def fused_output_loss(student, teacher, labels, mask, spec, *, evaluating: bool = False,
                      chunk_bytes: Optional[int] = None):
    """``(loss_sum, FusedStats)`` from captured ``HeadInputs`` (``models.output_capture``).

    labels, mask: ``[b, s]`` as in the batch (mask bool: response targets). ``loss_sum`` is
    ``sum_t mask[t] * per_token[t]`` (fp32, differentiable w.r.t. the student's hidden states and
    output weight when grad mode is on); FusedStats holds detached ``[b, s]`` per-token values.
    """
    hidden = _gather_hidden(student, spec)
    seq, batch, width = hidden.shape
    teacher_hidden = teacher_weight = None
    if teacher is not None:
        with torch.no_grad():
            teacher_hidden = _gather_hidden(teacher, spec).reshape(seq * batch, -1)
        teacher_weight = teacher.weight.detach()
    labels_sb = labels.t().reshape(-1)  # hidden rows are [s, b] ordered
    mask_sb = mask.t().reshape(-1)
    plan = _Plan(spec, evaluating, chunk_tokens_for(student.weight.shape[0], seq * batch, chunk_bytes))
    flat = hidden.reshape(seq * batch, width)
    if torch.is_grad_enabled() and (flat.requires_grad or student.weight.requires_grad):
        loss_sum = _FusedOutputLoss.apply(flat, student.weight, teacher_hidden, teacher_weight,
                                          labels_sb, mask_sb, plan)
        stats = plan.stats
    else:
        stats, _, _ = _run_chunks(flat.detach(), student.weight.detach(), teacher_hidden, teacher_weight,
                                  labels_sb, mask_sb, plan, want_grad=False)
        loss_sum = _masked_sum(stats.per_token, mask_sb)
    to_bs = lambda t: None if t is None else t.view(seq, batch).t()  # noqa: E731
    return loss_sum, FusedStats(*(to_bs(t) for t in stats))
