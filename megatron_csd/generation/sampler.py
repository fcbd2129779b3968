"""Choose the next token from vocab-parallel logits, identically at every TP layout.

Input: this rank's logits ``[b, V/TP]`` (columns ``[start, start + V/TP)`` of the padded
vocabulary), the real vocabulary limit (ids >= ``limit`` -- Megatron padding and, by default,
ids the tokenizer cannot decode -- are never chosen) and the tensor-parallel group. Every rank
of the group returns the same ids ``[b]``; no rank ever holds the whole vocabulary.

- greedy: argmax of the logits over the valid ids.
- sampling: s = logit / T (float64), then
  * top-k: each shard's k largest s are all-gathered (O(k * TP) values); the k-th largest of
    those is the global k-th largest, and s below it is masked (ties at it are kept, as
    transformers' TopKLogitsWarper does);
  * top-p: the nucleus is {j : mass of tokens with s > s_j < top_p} (transformers'
    TopPLogitsWarper: the smallest top set whose mass reaches top_p). The cut is found exactly
    by bisection on a threshold t with per-shard statistics: one SUM all-reduce per round of
    [mass(s > mid), count(lo < s < hi)] with p = exp(s - max) / Z (max: MAX all-reduce, Z: SUM
    all-reduce). Invariant: mass(s > lo) >= top_p > mass(s > hi); it stops when no token lies
    strictly between lo and hi, and then the nucleus is exactly {s > lo};
  * Gumbel-max: argmax of s + g with g keyed by (request seed, step, global id) (noise.py).
- the argmax across shards: MAX all-reduce of each shard's best value, then MIN all-reduce of
  the global ids reaching it (ties go to the lowest global id, as torch.argmax / HF greedy).
NaN (or +inf) logits in a row, on any shard, and a row whose every id is masked are errors on
every rank: the row's NaN flag (0/1, never a NaN value: gloo's MAX may drop a NaN) travels in
the MAX all-reduce, and every rank sets the row's id to the sentinel ``NAN_LOGITS`` (-1) or
``NOTHING_SAMPLABLE`` (-2) of errors.py. ``choose_token_codes`` returns those codes (the engine
broadcasts them over PP before raising); ``choose_tokens`` raises GenerationError at once.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_csd.generation.errors import NAN_LOGITS, NOTHING_SAMPLABLE, check_chosen
from megatron_csd.generation.noise import gumbel_noise
from megatron_csd.generation.params import SamplingParams

_MAX_BISECTION_ROUNDS = 2000  # float64 bisection ends after ~1100 halvings at the very worst


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _argmax_across_shards(values: torch.Tensor, global_ids: torch.Tensor, nan_rows: torch.Tensor,
                          group) -> torch.Tensor:
    """Global id of the row-wise maximum of values (lowest id on ties), reduced over `group`.

    Rows flagged in `nan_rows` on any rank get NAN_LOGITS; rows whose every value is -inf on
    every rank get NOTHING_SAMPLABLE (identically on every rank: decided from reduced values).
    """
    best = values.max(dim=-1).values
    stats = torch.stack([best, nan_rows.to(values.dtype)], dim=-1)
    _all_reduce(stats, dist.ReduceOp.MAX, group)
    best, nan_any = stats[:, 0], stats[:, 1] > 0
    big = torch.iinfo(torch.int64).max
    hits = values == best.unsqueeze(-1)
    candidates = torch.where(hits, global_ids.unsqueeze(0), torch.full_like(hits, big, dtype=torch.int64))
    choice = _all_reduce(candidates.min(dim=-1).values, dist.ReduceOp.MIN, group)
    choice = choice.masked_fill(torch.isneginf(best), NOTHING_SAMPLABLE)
    return choice.masked_fill(nan_any, NAN_LOGITS)


def _top_k_mask(scores: torch.Tensor, k: int, group) -> torch.Tensor:
    """scores with everything below the global k-th largest set to -inf."""
    local_k = min(k, scores.shape[-1])
    local = scores.topk(local_k, dim=-1).values
    if local_k < k:
        pad = torch.full((scores.shape[0], k - local_k), float("-inf"), dtype=scores.dtype, device=scores.device)
        local = torch.cat([local, pad], dim=-1)
    if group is not None and dist.get_world_size(group) > 1:
        shards = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, local.contiguous(), group=group)
        local = torch.cat(shards, dim=-1)
    threshold = local.topk(k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def top_p_mask(scores: torch.Tensor, top_p: float, group) -> torch.Tensor:
    """scores outside the top-p nucleus set to -inf (exact threshold search, see module doc)."""
    finite = torch.isfinite(scores)
    stats = torch.stack([scores.max(dim=-1).values,
                         -torch.where(finite, scores, torch.inf).min(dim=-1).values], dim=-1)
    _all_reduce(stats, dist.ReduceOp.MAX, group)
    top, bottom = stats[:, 0:1], -stats[:, 1:2]
    probs = torch.exp(scores - top)  # masked columns give exp(-inf) = 0
    norm = _all_reduce(probs.sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, group)
    probs = probs / norm
    lo, hi = bottom - 1.0, top.clone()
    for _ in range(_MAX_BISECTION_ROUNDS):
        mid = lo + (hi - lo) / 2
        stats = torch.cat([(probs * (scores > mid)).sum(dim=-1, keepdim=True),
                           ((scores > lo) & (scores < hi)).sum(dim=-1, keepdim=True).to(scores.dtype)],
                          dim=-1)
        _all_reduce(stats, dist.ReduceOp.SUM, group)
        open_rows = stats[:, 1:2] > 0
        if not bool(open_rows.any()):
            return scores.masked_fill(scores <= lo, float("-inf"))
        below = stats[:, 0:1] < top_p  # mid is a valid new hi
        hi = torch.where(open_rows & below, mid, hi)
        lo = torch.where(open_rows & ~below, mid, lo)
    raise AssertionError("top-p threshold search did not converge")


def choose_tokens(vocab_parallel_logits: torch.Tensor, params: SamplingParams, *, vocab_start: int,
                  limit: int, seeds: Sequence[int], steps: Sequence[int],
                  tp_group: Optional[object]) -> torch.Tensor:
    """Next token ids [b] (int64, identical on every rank of `tp_group`); math in module doc.

    vocab_parallel_logits: [b, V/TP], this rank's columns starting at global id `vocab_start`.
    limit: ids >= limit are never chosen. seeds / steps: per row, key the Gumbel noise.
    Raises GenerationError (on every rank of `tp_group`) for NaN logits or nothing samplable.
    """
    chosen = choose_token_codes(vocab_parallel_logits, params, vocab_start=vocab_start, limit=limit,
                                seeds=seeds, steps=steps, tp_group=tp_group)
    check_chosen(chosen.tolist(), steps=steps)
    return chosen


def choose_token_codes(vocab_parallel_logits: torch.Tensor, params: SamplingParams, *,
                       vocab_start: int, limit: int, seeds: Sequence[int], steps: Sequence[int],
                       tp_group: Optional[object]) -> torch.Tensor:
    """choose_tokens without raising: a bad row holds NAN_LOGITS / NOTHING_SAMPLABLE (< 0)."""
    logits = vocab_parallel_logits.detach()
    width = logits.shape[-1]
    global_ids = torch.arange(vocab_start, vocab_start + width, device=logits.device)
    nan_rows = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    scores = logits.to(torch.float64).masked_fill((global_ids >= limit).unsqueeze(0), float("-inf"))
    scores = scores.masked_fill(nan_rows.unsqueeze(-1), float("-inf"))
    if not params.greedy:
        scores = scores / params.temperature
        if params.top_k > 0:
            scores = _top_k_mask(scores, params.top_k, tp_group)
        if params.top_p < 1.0:
            scores = top_p_mask(scores, params.top_p, tp_group)
        scores = scores + gumbel_noise(seeds, steps, global_ids)
    return _argmax_across_shards(scores, global_ids, nan_rows, tp_group)
