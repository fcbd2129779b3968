"""Logged (no-gradient) vocab-parallel cross-entropy accumulated over token chunks.

For token t with vocab-parallel logits z (real columns only: padding is cut by width),

    ce[t] = log sum_x exp(z[x] - M) + M - z[label[t]],     M = max_x z[x] over every shard.

Each chunk of tokens contributes, on this rank, its local maximum m_r, the local normaliser
S_r = sum exp(z - m_r) and the label's logit when this rank holds the label's column (else 0).
After the last chunk, one MAX all-reduce gives M, S_r is moved to that frame exactly
(S_r exp(m_r - M)) and one SUM all-reduce of [S, z_label] combines the shards: two collectives
per call, whatever the number of chunks (Megatron's ``vocab_parallel_cross_entropy`` needs three
per call, i.e. per chunk). Statistics in fp32 (fp64 for fp64 logits); NaN logits propagate.
Used for the metrics of the fused output-layer loss (the student's CE when it is only logged,
the teacher's CE in evaluation); the differentiable CE stays Megatron's.
"""
from __future__ import annotations

import torch

from .row_ops import accumulation_dtype
from .vocab_shard import VocabShard


class ChunkedCrossEntropy:
    """``add(start, logits, labels)`` per token chunk, then ``finish()`` -> per-token CE ``[N]``."""

    def __init__(self, num_tokens: int, shard: VocabShard, dtype: torch.dtype, device):
        self.shard = shard
        self.dtype = accumulation_dtype(dtype)
        self.maxima = torch.full((num_tokens,), float("-inf"), dtype=self.dtype, device=device)
        self.sums = torch.zeros(num_tokens, 2, dtype=self.dtype, device=device)  # [S_r, z_label]

    def add(self, start: int, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Local statistics of rows ``start:start + len(logits)`` (logits ``[rows, V_local]``)."""
        end = start + logits.shape[0]
        width = self.shard.valid_width
        if width == 0:
            return
        z = logits[:, :width]
        maxima = z.amax(-1).to(self.dtype)
        shift = torch.where(maxima == float("-inf"), torch.zeros_like(maxima), maxima)  # all -inf: S_r = 0
        shifted = z.to(self.dtype) - shift.unsqueeze(-1)
        self.maxima[start:end] = maxima
        self.sums[start:end, 0] = shifted.exp_().sum(-1)
        local = labels - self.shard.rank * self.shard.local_width
        held = (local >= 0) & (local < width)
        picked = z.gather(-1, torch.where(held, local, torch.zeros_like(local)).unsqueeze(-1)).squeeze(-1)
        self.sums[start:end, 1] = torch.where(held, picked.to(self.dtype), torch.zeros((), dtype=self.dtype,
                                                                                         device=z.device))

    def finish(self) -> torch.Tensor:
        local_maxima = self.maxima
        maxima = self.shard.all_reduce_max(local_maxima.clone())
        rescale = torch.where(local_maxima == float("-inf"), torch.zeros_like(maxima),
                              (local_maxima - maxima).exp())
        self.sums[:, 0].mul_(rescale)
        sums = self.shard.all_reduce_sum(self.sums)
        return sums[:, 0].log() + maxima - sums[:, 1]
