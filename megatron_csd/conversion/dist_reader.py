"""Read regions of global tensors from a torch_dist (DCP) checkpoint, without Megatron.

Megatron's loader needs one shard per rank and a process group; the exporter instead asks
torch DCP for exactly the slices it wants (e.g. layer 7 of the layer-stacked QKV tensor), in
one process, with a planner that maps DCP's read items straight into preallocated tensors.
DCP works out which stored chunks overlap each region, so the checkpoint may have been
written at any TP/PP.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence, Union

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

PathLike = Union[str, os.PathLike]


def read_tensor_metadata(checkpoint_dir: PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (global shape, dtype) of every tensor in the checkpoint."""
    metadata = FileSystemReader(str(checkpoint_dir)).read_metadata()
    return {key: (tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


class _RegionLoadPlanner(DefaultLoadPlanner):
    def __init__(self, regions: dict[str, tuple[Sequence[int], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, tensor) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.size())
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.regions[index.fqn][1]


def read_regions(checkpoint_dir: PathLike,
                 requests: dict[str, tuple[Sequence[int], Sequence[int], torch.dtype]]) -> dict[str, torch.Tensor]:
    """requests: key -> (offsets, sizes, dtype) of a region of that global tensor."""
    regions = {key: (tuple(offsets), torch.empty(tuple(sizes), dtype=dtype))
               for key, (offsets, sizes, dtype) in requests.items()}
    with warnings.catch_warnings():
        # DCP warns on every no_dist load that it assumes a single process: what we asked for.
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or "
                                r"uninitialized, assuming the intent is to load in a single process")
        dcp_load({}, storage_reader=FileSystemReader(str(checkpoint_dir)),
                 planner=_RegionLoadPlanner(regions), no_dist=True)
    return {key: tensor for key, (_, tensor) in regions.items()}
