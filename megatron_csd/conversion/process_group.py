"""A one-process torch.distributed + Megatron model-parallel context for the converters.

dist_checkpointing and GPTModel construction need an initialised process group and
parallel_state even when nothing is parallel. Converters run in one process: reuse an existing
1-process setup, else create a gloo group over a file store (no network port) and tear down
only what was created here.
"""
from __future__ import annotations

import contextlib
import tempfile

import torch.distributed as dist


@contextlib.contextmanager
def single_process_model_parallel():
    from megatron.core import parallel_state

    created_group = False
    created_parallel_state = False
    tmp = None
    if not dist.is_initialized():
        tmp = tempfile.TemporaryDirectory(prefix="megatron_csd_pg_")
        store = dist.FileStore(f"{tmp.name}/store", 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        created_group = True
    elif dist.get_world_size() != 1:
        raise ValueError("the checkpoint converters run in a single process; do not launch them "
                         f"with torchrun (world size here is {dist.get_world_size()})")
    try:
        if parallel_state.model_parallel_is_initialized():
            if (parallel_state.get_tensor_model_parallel_world_size() != 1
                    or parallel_state.get_pipeline_model_parallel_world_size() != 1):
                raise ValueError("the converters need model parallel sizes 1 in this process")
        else:
            parallel_state.initialize_model_parallel()
            created_parallel_state = True
        yield
    finally:
        if created_parallel_state:
            parallel_state.destroy_model_parallel()
        if created_group:
            dist.destroy_process_group()
            tmp.cleanup()
