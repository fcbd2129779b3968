"""Vocabulary padding and tensor-parallel vocabulary shard ranges.

Megatron shards the vocabulary dimension of the embedding and of the output layer in equal
contiguous chunks over the tensor-parallel ranks, so the padded vocabulary size must be a
multiple of TP. Megatron's own default pads to ``128 * TP``, which ties a checkpoint to the TP
it was written at. We pad to a fixed multiple instead (default 1024 = 128 * 8), which every
TP in {1, 2, 4, 8} divides, so a converted teacher or a trained student loads at any of those
TPs. ``vocab_size`` is the MODEL's vocabulary (the embedding rows, an HF config's
``vocab_size``; it may exceed the tokenizer's ids, e.g. Qwen2.5's 151936 rows for ~151665 ids,
and those extra rows are real columns). Only columns ``>= vocab_size`` are padding: they hold
zero weights and must be ignored by every loss statistic (see ``megatron_csd.losses``).
"""
from __future__ import annotations

DEFAULT_VOCAB_MULTIPLE = 1024


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def padded_vocab_size(vocab_size: int, *, multiple: int = DEFAULT_VOCAB_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is >= ``vocab_size`` (GPT-2: 50257 -> 51200)."""
    _check_positive_int("vocab_size", vocab_size)
    _check_positive_int("multiple", multiple)
    return -(-vocab_size // multiple) * multiple


def vocab_shard_range(padded_vocab: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """Half-open column range ``[start, end)`` of the padded vocabulary held by ``tp_rank``.

    Matches Megatron's ``VocabUtility.vocab_range_from_global_vocab_size``: rank r holds
    ``[r * padded_vocab / tp_size, (r + 1) * padded_vocab / tp_size)``.
    """
    _check_positive_int("padded_vocab", padded_vocab)
    _check_positive_int("tp_size", tp_size)
    if not isinstance(tp_rank, int) or isinstance(tp_rank, bool) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be an int in [0, {tp_size}), got {tp_rank!r}")
    if padded_vocab % tp_size:
        raise ValueError(
            f"padded vocabulary {padded_vocab} is not divisible by tensor-parallel size "
            f"{tp_size}; pad it with padded_vocab_size(vocab, multiple=...) to a multiple of TP")
    per_rank = padded_vocab // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def mask_padded_vocab_logits(vocab_parallel_logits, vocab_size: int, *, tp_rank: int, tp_size: int):
    """Copy of `[..., V_local]` logits with Megatron's padded columns (global id >= vocab_size,
    the model's vocabulary) at -inf; the input itself when this shard has no padded column.

    Padded rows of the embedding / output layer are zero, so their logits are 0, not -inf; any
    softmax over the padded vocabulary (cross-entropy included) must mask them first or it
    disagrees with the unpadded model. No communication.
    """
    import torch

    local = vocab_parallel_logits.shape[-1]
    start, end = vocab_shard_range(local * tp_size, tp_rank, tp_size)
    if vocab_size >= end:
        return vocab_parallel_logits
    column_ids = torch.arange(start, end, device=vocab_parallel_logits.device)
    return vocab_parallel_logits.masked_fill(column_ids >= vocab_size, float("-inf"))
