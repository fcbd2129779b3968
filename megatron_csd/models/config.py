"""`ModelConfig`: the architecture of one GPT-style model (teacher or student), HF-faithful.

A ModelConfig names a family ("gemma", "llama", "gpt2"), which fixes the parts of the
architecture that are not numbers:

| family | norm                              | MLP              | positions        | biases | embedding scale |
|--------|-----------------------------------|------------------|------------------|--------|-----------------|
| gemma  | RMSNorm, zero-centred: x*(1+w)    | GeGLU, tanh GELU | RoPE             | none   | sqrt(hidden)    |
| llama  | RMSNorm: x*w                      | SwiGLU (SiLU)    | RoPE             | none   | 1               |
| gpt2   | LayerNorm with bias               | GELU (tanh), 4h  | learned absolute | all    | 1               |

The numbers (layers, widths, heads, vocabulary, ...) are the fields below. `vocab_size` is the
model's vocabulary: its embedding rows (an HF config's `vocab_size`, which may exceed the
tokenizer's ids; the losses use all of them); `padded_vocab_size` is the width of the Megatron
embedding / output layer (default: `padded_vocab_size(vocab_size)`, a multiple of 1024 so any
TP <= 8 can shard it); only the columns between the two are padding.
The translation to Megatron's TransformerConfig lives in `models/builder.py` only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from megatron_csd.parallel.vocab import padded_vocab_size as _pad_vocab

FAMILIES = ("gemma", "llama", "gpt2")


@dataclass
class ModelConfig:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    num_query_groups: Optional[int] = None  # default: num_attention_heads (MHA)
    kv_channels: Optional[int] = None  # head dim; default hidden_size // num_attention_heads
    padded_vocab_size: Optional[int] = None  # default: padded_vocab_size(vocab_size)
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0  # ignored by gpt2 (learned positions)
    tie_embeddings: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "vocab_size", "max_position_embeddings"):
            _check_positive_int(name, getattr(self, name))
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        _check_positive_int("num_query_groups", self.num_query_groups)
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set kv_channels (the head dim) explicitly")
            self.kv_channels = self.hidden_size // self.num_attention_heads
        _check_positive_int("kv_channels", self.kv_channels)
        if self.padded_vocab_size is None:
            self.padded_vocab_size = _pad_vocab(self.vocab_size)
        _check_positive_int("padded_vocab_size", self.padded_vocab_size)
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size ({self.padded_vocab_size}) must be >= "
                             f"vocab_size ({self.vocab_size})")
        for name in ("norm_epsilon", "rope_theta", "init_method_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"ModelConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    # Family-derived architecture facts (single source for the builder and the converter).
    @property
    def normalization(self) -> str:
        return "LayerNorm" if self.family == "gpt2" else "RMSNorm"

    @property
    def zero_centered_norm(self) -> bool:
        return self.family == "gemma"

    @property
    def gated_mlp(self) -> bool:
        return self.family in ("gemma", "llama")

    @property
    def add_bias(self) -> bool:
        return self.family == "gpt2"

    @property
    def position_embedding_type(self) -> str:
        return "learned_absolute" if self.family == "gpt2" else "rope"

    @property
    def embedding_scale(self) -> Optional[float]:
        """Factor applied to the embedding output (Gemma: sqrt(hidden)), None for none."""
        return self.hidden_size ** 0.5 if self.family == "gemma" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise TypeError(f"ModelConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {unknown}; allowed keys: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes` applied (padded_vocab_size is re-derived if vocab_size changes
        and no padded size is given)."""
        if "vocab_size" in changes and "padded_vocab_size" not in changes:
            changes["padded_vocab_size"] = None
        return dataclasses.replace(self, **changes)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ModelConfig.{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"ModelConfig.{name} must be positive, got {value}")
