"""Token sequences for instruction tuning: truncation, prompt/response masking, right padding.

A tokenized sample is `ids = [bos] + head + tail + response + [eos]` with `prompt_length =
1 + len(head) + len(tail)` (no bos when the tokenizer has none). Training at sequence length
`s` uses `s + 1` ids: position t has input `ids[t]` and target `ids[t + 1]`, so

    tokens[t]    = ids[t]                      (pad_id beyond the sample)
    labels[t]    = ids[t + 1]                  (pad_id beyond the sample)
    loss_mask[t] = 1  iff  prompt_length <= t + 1 < len(ids)   (the target is a response
                                                               token or the final eos)
    position_ids = 0 .. s - 1

Truncation to at most `s + 1` ids keeps the response: first the prompt head is cut to
`max_prompt_length` (if given), then the head is cut further from its end until the sample fits;
the bos and the prompt tail are never cut. If bos + tail + response still does not fit, the
response loses its end (and with it the eos). A seq length that cannot hold bos + tail + one
response token is an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_csd.data.records import InstructionRecord
from megatron_csd.data.templates import render
from megatron_csd.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenizedSample:
    ids: list[int]
    prompt_length: int
    prompt_truncated: bool = False
    response_truncated: bool = False


def encode_prompt(record: InstructionRecord, template: str, tokenizer: Tokenizer,
                  max_prompt_length: int | None = None) -> list[int]:
    """Prompt ids exactly as training sees them (bos + head + tail), e.g. for generation."""
    rendered = render(record, template)
    head, tail = tokenizer.encode(rendered.prompt_head), tokenizer.encode(rendered.prompt_tail)
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if max_prompt_length is not None:
        head = head[:max(0, max_prompt_length - len(bos) - len(tail))]
    return bos + head + tail


def truncate_sample(head: list[int], tail: list[int], response: list[int], *, bos_id: int | None,
                    eos_id: int, seq_length: int, max_prompt_length: int | None = None) -> TokenizedSample:
    """Assemble and truncate one sample to at most `seq_length + 1` ids (rules in module doc)."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    bos = [] if bos_id is None else [bos_id]
    response = response + [eos_id]
    max_ids = seq_length + 1
    fixed_prompt = len(bos) + len(tail)
    if fixed_prompt + 1 > max_ids:
        raise ValueError(f"seq_length {seq_length} cannot hold the prompt template's fixed tokens "
                         f"({fixed_prompt}) plus one response token; use a larger --seq-length")
    head_budget = len(head)
    if max_prompt_length is not None:
        head_budget = min(head_budget, max(0, max_prompt_length - fixed_prompt))
    head_budget = min(head_budget, max(0, max_ids - fixed_prompt - len(response)))
    prompt_truncated = head_budget < len(head)
    prompt = bos + head[:head_budget] + tail
    response_budget = max_ids - len(prompt)
    response_truncated = response_budget < len(response)
    ids = prompt + response[:response_budget]
    return TokenizedSample(ids, len(prompt), prompt_truncated, response_truncated)


def tokenize_records(records: list[InstructionRecord], template: str, tokenizer: Tokenizer, *,
                     seq_length: int, max_prompt_length: int | None = None) -> list[TokenizedSample]:
    """Render with `template`, tokenize (batched) and truncate each record."""
    rendered = [render(record, template) for record in records]
    heads = tokenizer.encode_batch([r.prompt_head for r in rendered])
    tails = tokenizer.encode_batch([r.prompt_tail for r in rendered])
    responses = tokenizer.encode_batch([r.response for r in rendered])
    return [truncate_sample(head, tail, response, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                            seq_length=seq_length, max_prompt_length=max_prompt_length)
            for head, tail, response in zip(heads, tails, responses)]


def build_training_sample(ids, prompt_length: int, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """ids (<= seq_length + 1 of them) -> tokens / labels / loss_mask / position_ids of length s."""
    ids = np.asarray(ids, dtype=np.int64)
    num_ids = ids.shape[0]
    if num_ids > seq_length + 1:
        raise ValueError(f"sample has {num_ids} ids but seq_length {seq_length} holds at most "
                         f"{seq_length + 1}")
    padded = np.full(seq_length + 1, pad_id, dtype=np.int64)
    padded[:num_ids] = ids
    target_positions = np.arange(1, seq_length + 1)
    loss_mask = (target_positions >= prompt_length) & (target_positions < num_ids)
    return {
        "tokens": torch.from_numpy(padded[:-1].copy()),
        "labels": torch.from_numpy(padded[1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "position_ids": torch.arange(seq_length, dtype=torch.int64),
    }
