"""The generation API's value types: sampling parameters, one request, one result.

Validated in ``__post_init__`` (ValueError naming the bad value and the allowed ones), so a bad
command-line value fails before any model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

FINISH_REASONS = ("eos", "stop", "length")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    greedy: argmax over the real (and decodable) vocabulary; temperature / top_k / top_p are
    then ignored. Otherwise tokens are drawn from softmax(logits / temperature) restricted to
    the top_k largest logits (0 = off), then to the top-p nucleus (1.0 = off), in that order
    (as transformers' TopK/TopP warpers). ``eos_id``: the stop token (None: never stops on
    eos). ``stop_strings``: stop once the decoded completion contains one (needs a tokenizer).
    ``decodable_vocab_size``: ids >= this are never produced (the tokenizer's size); None: the
    model's vocabulary (``allow_undecodable_ids`` in the CLI sets it to None).
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    eos_id: Optional[int] = None
    stop_strings: tuple[str, ...] = ()
    decodable_vocab_size: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.greedy, bool):
            raise ValueError(f"greedy must be True or False, got {self.greedy!r}")
        temperature = self.temperature
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r} "
                             "(use greedy=True / --greedy for argmax decoding)")
        object.__setattr__(self, "temperature", float(temperature))
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        top_p = self.top_p
        if (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1.0 = off), got {top_p!r}")
        object.__setattr__(self, "top_p", float(top_p))
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.eos_id is not None and (not _is_int(self.eos_id) or self.eos_id < 0):
            raise ValueError(f"eos_id must be a token id >= 0 or None, got {self.eos_id!r}")
        stops = self.stop_strings
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop_strings must be a tuple of non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop_strings", tuple(stops))
        size = self.decodable_vocab_size
        if size is not None and (not _is_int(size) or size < 1):
            raise ValueError(f"decodable_vocab_size must be a positive int or None, got {size!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt. ``prompt_ids`` already include bos; ``seed`` keys this request's noise."""

    prompt_ids: list[int]
    seed: int = 0

    def __post_init__(self):
        ids = self.prompt_ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
            raise ValueError(f"prompt_ids must be a non-empty list of token ids, got {ids!r:.80}")
        if not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"prompt_ids must hold ints >= 0, got {list(ids)!r:.80}")
        object.__setattr__(self, "prompt_ids", [int(i) for i in ids])
        if not _is_int(self.seed) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")


@dataclass(frozen=True)
class GenerationResult:
    """``completion_ids``: generated ids without the stopping eos (with ``stop``: up to and
    including the token that completed the stop string). ``completion``: the decoded text, cut
    before the stop string (None without a tokenizer)."""

    completion_ids: list[int]
    finish_reason: str
    completion: Optional[str] = field(default=None)

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
