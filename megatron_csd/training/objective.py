"""forward_step / loss_func for Megatron's ``get_forward_backward_func()`` schedules.

Per microbatch, on the last pipeline stage (vocab-parallel logits ``[b, s, V_pad / TP]``):

    kd[t] = distillation_loss(student[t], teacher[t])         (megatron_csd.losses, fp32)
    ce[t] = -log softmax(student[t])[label[t]]                 (Megatron's vocab_parallel_cross_entropy
                                                                 on an fp32 COPY with padded columns
                                                                 at -inf; it overwrites its input)
    loss[t] = kd_ratio * kd[t] + (1 - kd_ratio) * ce[t]        (distill)  |  ce[t]  (sft)
    loss_sum = sum_t mask[t] * loss[t],   num_tokens = sum_t mask[t]

The columns are the model's vocabulary, ``spec.vocab_size`` = the embedding rows of the
converted / trained model (teacher and student have the same); only Megatron's padding columns
``[vocab_size, padded_vocab_size)`` are masked (-inf), in every term. Rows the tokenizer never
emits take part like any other row.

``mask`` is 1 on response targets only (prompt and padding are 0). The function returns the
3-tuple ``(loss_sum, num_tokens, {metric: [sum, count]})``. The model's TransformerConfig has
``calculate_per_token_loss=True``, so the schedule does NOT divide by the microbatch count;
Megatron DDP sums gradients over DP (no 1/DP pre-scaling), and ``finalize_model_grads``
broadcasts the last stage's total token count over PP, all-reduces it over DP and scales the
gradients by ``1 / num_tokens``: the gradient is that of the global per-token mean over every
microbatch and DP rank, whatever the layout. Masked positions are selected out with
``torch.where`` (not multiplied), so a microbatch without response tokens contributes exactly 0
loss and 0 gradient, never NaN.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the loss function needs besides the tensors (fixed for the run)."""

    distill: bool
    loss_config: object          # megatron_csd.losses.LossConfig (distill only)
    kd_ratio: float              # weight of the distillation term (1.0 = pure distillation)
    vocab_size: int              # the models' vocabulary (rows); columns >= it are Megatron padding
    padded_vocab_size: int
    tp_group: object
    tp_rank: int
    tp_size: int


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def response_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor,
                           spec: ObjectiveSpec) -> torch.Tensor:
    """Per-token CE over the model's vocabulary with vocab-parallel logits; input left untouched.

    ``ce[t] = logsumexp_{v < vocab_size} z[t, v] - z[t, label[t]]``: Megatron's CE (one max and
    two sum all-reduces over the TP group) on an fp32 copy whose padding columns are -inf.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_csd.parallel.vocab import mask_padded_vocab_logits

    logits = student_logits.to(torch.float32, copy=True)  # Megatron's CE overwrites its input
    logits = mask_padded_vocab_logits(logits, spec.vocab_size, tp_rank=spec.tp_rank, tp_size=spec.tp_size)
    # Megatron's CE wants [s, b] targets with [s, b, V] logits; any layout with matching
    # leading dims works since it only flattens them.
    return vocab_parallel_cross_entropy(logits, labels)


class TokenTerms(NamedTuple):
    """Per-token terms ``[b, s]`` of one microbatch (kd is None in SFT mode)."""

    loss: torch.Tensor           # the optimised loss
    ce: torch.Tensor             # student response CE (detached unless it is optimised)
    kd: Optional[torch.Tensor]   # distillation term


def per_token_terms(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                    labels: torch.Tensor, spec: ObjectiveSpec) -> TokenTerms:
    """``loss[t] = kd_ratio * kd[t] + (1 - kd_ratio) * ce[t]`` (distill) or ``ce[t]`` (sft),
    over the columns ``< spec.vocab_size``; unmasked, every position of the microbatch."""
    if not spec.distill:
        ce = response_cross_entropy(student_logits, labels, spec)
        return TokenTerms(loss=ce, ce=ce, kd=None)
    from megatron_csd.losses import distillation_loss

    kd = distillation_loss(student_logits, teacher_logits, spec.loss_config,
                           tp_group=spec.tp_group if spec.tp_size > 1 else None,
                           vocab_size=spec.vocab_size)
    if spec.kd_ratio < 1.0:
        ce = response_cross_entropy(student_logits, labels, spec)
        return TokenTerms(loss=spec.kd_ratio * kd + (1.0 - spec.kd_ratio) * ce, ce=ce, kd=kd)
    with torch.no_grad():  # logged only
        ce = response_cross_entropy(student_logits.detach(), labels, spec)
    return TokenTerms(loss=kd, ce=ce, kd=kd)


def loss_func(batch: dict, teacher_logits: Optional[torch.Tensor], spec: ObjectiveSpec,
              evaluating: bool, student_logits: torch.Tensor):
    """The schedule's 3-tuple ``(loss_sum, num_tokens, {name: tensor([sum, count])})``.

    Metrics: ``loss`` (the optimised per-token loss), ``ce`` (student response CE), ``kd``
    (distillation term, distill mode), ``teacher_ce`` (teacher response CE, evaluation only).
    """
    mask = batch["loss_mask"] > 0
    labels = torch.where(mask, batch["labels"], torch.zeros_like(batch["labels"]))
    num_tokens = mask.sum().to(torch.int)
    count = num_tokens.to(torch.float32)
    terms = per_token_terms(student_logits, teacher_logits, labels, spec)
    metrics = {}
    if terms.kd is not None:
        metrics["kd"] = torch.stack([_masked_sum(terms.kd.detach(), mask), count])
    metrics["ce"] = torch.stack([_masked_sum(terms.ce.detach(), mask), count])
    if evaluating and spec.distill:
        with torch.no_grad():
            teacher_ce = response_cross_entropy(teacher_logits, labels, spec)
        metrics["teacher_ce"] = torch.stack([_masked_sum(teacher_ce, mask), count])
    loss_sum = _masked_sum(terms.loss, mask)
    metrics["loss"] = torch.stack([loss_sum.detach(), count])
    return loss_sum, num_tokens, metrics


def metric_names(spec: ObjectiveSpec, evaluating: bool) -> list[str]:
    """The keys of loss_func's metrics dict, in a fixed order (same on every rank)."""
    names = ["loss", "ce"]
    if spec.distill:
        names.append("kd")
        if evaluating:
            names.append("teacher_ce")
    return names


def make_forward_step(spec: ObjectiveSpec, *, evaluating: bool = False):
    """``forward_step_func(data_iterator, model)`` for the schedule.

    Every stage draws the microbatch (so all ranks stay in step); the first stage feeds
    tokens/positions, the last stage's loss uses labels and mask. The causal mask is built by
    the attention layer (``attention_mask=None``), except for packed batches (``segment_ids``):
    there every stage builds the block-diagonal causal mask (or THD ``packed_seq_params`` on the
    TE spec) from its copy of the batch and student and teacher get the same one
    (megatron_csd.models.packed_attention).
    """
    from megatron_csd.models.packed_attention import packed_forward_kwargs
    from megatron_csd.training.fused_objective import FusedHeads, fused_loss_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        lm_batch = "lm_weight" in batch
        # The LM term's CE needs the student's logits: the fused head capture stays off for it.
        output = model(batch["tokens"], batch["position_ids"], capture_heads=not lm_batch,
                       **packed_forward_kwargs(batch, model))
        if isinstance(output, tuple):  # last stage: (student_logits, teacher_logits)
            student_logits, teacher_logits = output
        else:
            student_logits, teacher_logits = output, None
        if lm_batch:  # a plain-text microbatch of the optional LM term (lm_term.py)
            from megatron_csd.training.lm_term import lm_loss_func

            return student_logits, functools.partial(lm_loss_func, batch, spec, metric_names(spec, evaluating))
        if isinstance(teacher_logits, FusedHeads):  # fused output layer + loss (fused_loss.py)
            return student_logits, functools.partial(fused_loss_func, batch, teacher_logits, spec, evaluating)
        return student_logits, functools.partial(loss_func, batch, teacher_logits, spec, evaluating)

    return forward_step
