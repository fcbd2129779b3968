"""Counter-based Gumbel noise keyed by (request seed, generation step, GLOBAL vocabulary id).

Layout-independent sampling needs noise that does not depend on which rank holds a vocabulary
column: every tensor-parallel shard computes the noise of its own global ids from the key
alone, so the same request gives the same tokens at TP 1, 2, 4 or under PP, and in any batch.

Hash: murmur3's 32-bit finaliser ``fmix32`` (a bijection on 32-bit words with full avalanche),

    k1 = fmix32(seed_lo ^ fmix32(seed_hi ^ C1)),   k2 = fmix32(step ^ fmix32(k1 + C2))
    h  = fmix32(fmix32(id ^ k1) ^ k2)
    u  = (h + 0.5) / 2**32 in (0, 1),   g = -log(-log(u))   (float64, standard Gumbel)

The per-row keys are derived in Python integers; the per-id part runs in int64 torch ops that
never overflow (32-bit products are split into 16-bit halves), so the result is bit-identical
on every machine and layout. The argmax of ``logit / T + g`` is then a draw from
softmax(logit / T) (the Gumbel-max trick).
"""
from __future__ import annotations

from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x243F6A88, 0x9E3779B9
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35


def _fmix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 13
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for int64 x in [0, 2**32), without int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 13)
    x = _mul32(x, _M2)
    return x ^ (x >> 16)


def row_keys(seeds: Sequence[int], steps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 32-bit keys (k1, k2) as int64 tensors [b] for (seed, step) pairs."""
    k1 = [_fmix32_int((s & _MASK32) ^ _fmix32_int((s >> 32) ^ _C1)) for s in seeds]
    k2 = [_fmix32_int(t ^ _fmix32_int(a + _C2)) for a, t in zip(k1, steps)]
    return torch.tensor(k1, dtype=torch.int64), torch.tensor(k2, dtype=torch.int64)


def uniform_noise(seeds: Sequence[int], steps: Sequence[int], global_ids: torch.Tensor) -> torch.Tensor:
    """u[b, v] in (0, 1), float64, a function of (seeds[b], steps[b], global_ids[v]) only."""
    k1, k2 = row_keys(seeds, steps)
    k1, k2 = k1.to(global_ids.device), k2.to(global_ids.device)
    ids = (global_ids.to(torch.int64) & _MASK32).unsqueeze(0)
    h = _fmix32(_fmix32(ids ^ k1.unsqueeze(1)) ^ k2.unsqueeze(1))
    return (h.to(torch.float64) + 0.5) / float(2 ** 32)


def gumbel_noise(seeds: Sequence[int], steps: Sequence[int], global_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise g[b, v] = -log(-log(u)) (float64), keyed as ``uniform_noise``."""
    return -torch.log(-torch.log(uniform_noise(seeds, steps, global_ids)))
