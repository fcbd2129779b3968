"""Write a Megatron dist_checkpointing (torch_dist) checkpoint one tensor at a time.

Megatron's own saver stages every tensor of the state dict before writing, i.e. the whole
model in memory. The converter instead:
1. builds the GPTModel on the `meta` device (no memory) and takes its `sharded_state_dict()`
   -- so keys, global shapes, layer offsets and checkpoint factories are exactly Megatron's;
2. hands it to `dist_checkpointing.save` with `LazyTensorSaveStrategy`, which is Megatron's
   torch_dist strategy except that it writes through torch DCP's plain `FileSystemWriter`
   with one file per tensor chunk and a planner whose `resolve_data` computes each chunk on
   demand from a callback (`produce(key, offsets, sizes, dtype) -> tensor`).
DCP writes the chunks serially and drops each one once written (one file per chunk keeps
its per-file bookkeeping from holding earlier tensors), so peak memory is about one tensor
plus its HF sources. Metadata (`.metadata`, Megatron's `metadata.json`, `common.pt`) is
the same as Megatron writes, and `dist_checkpointing.load` reads the result at any TP/PP.

Uses two private helpers of megatron.core.dist_checkpointing.strategies.torch
(`_replace_state_dict_keys_with_sharded_keys`, `mcore_to_pyt_state_dict`), present in
megatron-core 0.16 and 0.19.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType

Producer = Callable[[str, Sequence[int], Sequence[int], torch.dtype], torch.Tensor]


class _LazyPlanner(MCoreSavePlanner):
    """Resolves meta placeholder tensors through the producer when DCP writes them."""

    def __init__(self, produce: Producer, **kwargs):
        super().__init__(**kwargs)
        self._produce = produce

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        chunk = write_item.tensor_data.chunk
        dtype = write_item.tensor_data.properties.dtype
        tensor = self._produce(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes), dtype)
        if tuple(tensor.shape) != tuple(chunk.sizes) or tensor.dtype != dtype:
            raise AssertionError(f"producer returned {tuple(tensor.shape)} {tensor.dtype} for "
                                 f"{write_item.index.fqn}, expected {tuple(chunk.sizes)} {dtype}")
        return tensor.contiguous()


class LazyTensorSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save strategy whose tensor data come from `produce`, chunk by chunk."""

    def __init__(self, produce: Producer):
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self._produce = produce

    def save(self, sharded_state_dict, checkpoint_dir):
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=False, thread_count=1,
                                  sync_files=True)
        producer_errors = []

        def produce(*args):
            try:
                return self._produce(*args)
            except BaseException as err:
                producer_errors.append(err)
                raise

        planner = _LazyPlanner(produce, dedup_replicated_tensors=False, flatten_state_dict=False)
        try:
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
        except BaseException as err:  # CheckpointException derives from BaseException
            # DCP wraps failures in CheckpointException; surface the producer's own error
            # (e.g. a ValueError naming a bad HF tensor) instead.
            if producer_errors:
                raise producer_errors[0] from err
            raise

    def async_save(self, sharded_state_dict, checkpoint_dir):
        raise NotImplementedError("LazyTensorSaveStrategy writes synchronously")
