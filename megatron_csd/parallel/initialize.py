"""Process-group set-up for a run: torch.distributed, Megatron's parallel_state, RNG.

``initialize_parallel`` is the one place the trainer touches ``parallel_state`` set-up. It
joins (or creates) the default process group -- NCCL on CUDA, gloo on CPU, where the opt-in
CPU compatibility layer is switched on first -- builds the TP / PP / DP groups with
``initialize_model_parallel`` and seeds the model-parallel RNG. The returned
:class:`ParallelContext` carries the groups and ranks explicitly so the layers below take them
as arguments instead of reading globals.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_csd.parallel.cpu_mode import enable_cpu_mode, seed_model_parallel_rng


@dataclass(frozen=True)
class ParallelContext:
    device: torch.device
    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that prints and writes metrics: global rank 0 (losses are broadcast)."""
        return self.rank == 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; ``cuda`` without CUDA fails."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device; use "
                         "--device cpu (or auto)")
    if device == "cpu" and torch.cuda.is_available():
        raise ValueError(
            "device 'cpu' requested on a machine with CUDA: the CPU compatibility layer must "
            "not run beside CUDA. Set CUDA_VISIBLE_DEVICES='' to force a CPU run, or use --device cuda")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device!r}")
    return device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _init_default_group(device: str) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))


def limit_cpu_threads() -> int:
    """Give each local process an equal share of the cores (unless OMP_NUM_THREADS is set).

    Several ranks on one CPU machine, each with torch's default thread pool (one thread per
    core), oversubscribe the cores, and OpenMP's spinning threads then make small matmuls
    tens of times slower. torchrun already exports OMP_NUM_THREADS=1; this covers other
    launchers. Returns the thread count in use.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(local_procs, 1)))
    return torch.get_num_threads()


def initialize_parallel(*, device: str, tensor_model_parallel_size: int,
                        pipeline_model_parallel_size: int, seed: int) -> ParallelContext:
    """Join the world, build Megatron's groups, seed RNG; returns the explicit context.

    ``device`` is ``cpu`` or ``cuda`` (already resolved). World size must be a multiple of
    TP x PP (checked by the caller with a clear message before this is reached).
    """
    from megatron.core import parallel_state

    if device == "cpu":
        enable_cpu_mode()
        limit_cpu_threads()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _init_default_group(device)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size)
    seed_model_parallel_rng(seed)
    return ParallelContext(
        device=torch.device("cpu") if device == "cpu" else torch.device("cuda", torch.cuda.current_device()),
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups (the default process group stays; the launcher owns it)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
