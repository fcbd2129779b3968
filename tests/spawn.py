"""Run a test body in N gloo processes on this machine (no torch test-base classes).

`run_distributed(fn, world_size, *args)` starts `world_size` processes with the spawn method;
each initialises a gloo process group on a free localhost port, calls `fn(rank, world_size,
*args)` and tears the group down. A failure (exception or non-zero exit) in any rank fails the
caller with that rank's traceback. `fn` must be importable (a module-level function).
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, fn, args, error_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    except BaseException:  # report every failure, including assertion errors, to the parent
        error_queue.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600.0) -> None:
    ctx = mp.get_context("spawn")
    error_queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, error_queue))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    if not error_queue.empty():
        rank, tb = error_queue.get()
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    codes = [proc.exitcode for proc in procs]
    if any(code != 0 for code in codes):
        raise AssertionError(f"distributed test processes exited with codes {codes} (timeout {timeout}s?)")
