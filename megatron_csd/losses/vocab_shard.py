"""Where a rank's vocabulary shard sits, which of its columns are real, and the two collectives.

Under tensor parallelism rank r of the group holds logits for vocabulary columns
`[r * V_local, (r + 1) * V_local)`. Megatron pads the vocabulary to a multiple of
`make_vocab_size_divisible_by * TP`, so the last ranks may hold padded columns (index >= the real
vocabulary size); they are cut off here by width and never enter a statistic. Real columns are
always a prefix of the local shard, so the cut is a zero-cost view.

All collectives of the loss go through `VocabShard.all_reduce_max/sum`, which call
`torch.distributed.all_reduce` (looked up at call time, so tests can count calls). Without a group
(or with a group of one rank) they do nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    group: Optional[object]
    rank: int
    world_size: int
    local_width: int
    valid_width: int
    """Real columns held by this rank (a prefix of the local shard); may be 0."""

    @property
    def distributed(self) -> bool:
        return self.group is not None and self.world_size > 1

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor


def describe_shard(local_width: int, tp_group=None, vocab_size: Optional[int] = None) -> VocabShard:
    """Locate this rank's shard; `vocab_size` (the real vocabulary) defaults to all columns."""
    if tp_group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("tp_group was given but torch.distributed is not initialised; "
                             "call torch.distributed.init_process_group first or pass tp_group=None")
        rank, world_size = dist.get_rank(tp_group), dist.get_world_size(tp_group)
        if rank < 0:
            raise ValueError("this process is not a member of the given tp_group")
    else:
        rank, world_size = 0, 1
    total_width = local_width * world_size
    if vocab_size is None:
        vocab_size = total_width
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int (the real, unpadded vocabulary), got {vocab_size!r}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size > total_width:
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the sharded logit width {local_width} x "
            f"{world_size} rank(s) = {total_width}; pass the real vocabulary size of the model "
            "whose logits these are (or logits that cover the whole padded vocabulary)")
    valid_width = min(max(vocab_size - rank * local_width, 0), local_width)
    return VocabShard(tp_group if world_size > 1 else None, rank, world_size, local_width, valid_width)
