"""A checkpoint save that fails (disk full, quota, I/O error) fails on every rank, cleanly.

``save_checkpoint`` catches an ``OSError`` from its own writes on each rank and, where it would
otherwise only wait at a barrier, calls ``agree_on_save_failure``: one SUM all-reduce of a 0/1
flag (all ranks reach it, so none hangs). If any rank failed, the failing ranks' (rank, path,
errno, message) are gathered, rank 0 removes the incomplete ``iter_N.tmp``, and every rank
raises ``CheckpointSaveError`` naming the failed path, and saying that the disk is full when
it is ENOSPC / EDQUOT. The previous checkpoint and ``latest`` are never touched (the new one
was still a ``.tmp``).

Limit: a failure inside one of Megatron's collective writers (``dist_checkpointing.save``) on
some ranks only can still leave the others waiting inside that writer; a full disk usually hits
every writer at once.
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; its partial ``.tmp`` folder was removed."""


def _describe(failure: tuple) -> str:
    rank, path, code, text = failure
    reason = "the disk is full (no space left on device)" if code in _DISK_FULL else text
    return f"rank {rank} could not write {path}: {reason}"


def agree_on_save_failure(error: Optional[OSError], tmp: str, *, rank: int, device=None) -> None:
    """Collective: raise CheckpointSaveError on every rank if ``error`` is set on any rank.

    ``device``: where the flag lives for the all-reduce (the run's device; CUDA under NCCL).
    """
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    flag = torch.tensor([0.0 if error is None else 1.0], device=device)
    if distributed:
        dist.all_reduce(flag)
    if flag.item() == 0:
        return
    mine = None if error is None else (rank, error.filename or tmp, error.errno, error.strerror or str(error))
    failures = [mine]
    if distributed:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, mine)
    failures = [item for item in failures if item is not None]
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    disk_full = any(item[2] in _DISK_FULL for item in failures)
    code = errno.ENOSPC if disk_full else (failures[0][2] or errno.EIO)
    removed = "was removed" if not os.path.exists(tmp) else "could not be removed; delete it"
    raise CheckpointSaveError(
        code, f"checkpoint save failed: {'; '.join(_describe(item) for item in failures)}. "
        f"The incomplete {tmp} {removed}; the previous checkpoint and 'latest' are unchanged. "
        f"{'Free disk space' if disk_full else 'Fix the problem'} (or choose another --save) and "
        "resume from the last checkpoint with --load")


def reject_unfinished_save(load: str, *, state_file: str, latest_file: str) -> None:
    """``--load .../iter_N.tmp``: a ValueError saying the save did not finish, and what to load."""
    path = os.path.normpath(load)
    if not os.path.basename(path).endswith(".tmp"):
        return
    save_dir = os.path.dirname(path) or "."
    complete = sorted(name for name in os.listdir(save_dir) if name.startswith("iter_")
                      and not name.endswith(".tmp") and os.path.isfile(os.path.join(save_dir, name, state_file))) \
        if os.path.isdir(save_dir) else []
    has_latest = os.path.isfile(os.path.join(save_dir, latest_file))
    choices = []
    if has_latest:
        choices.append(f"--load {save_dir} (its '{latest_file}')")
    if complete:
        choices.append(f"--load {os.path.join(save_dir, complete[-1])} (the newest complete iter_*)")
    advice = "use " + " or ".join(choices) if choices else f"no complete checkpoint is in {save_dir}"
    raise ValueError(f"--load {load}: this is an unfinished save (a '.tmp' folder: the run stopped "
                     f"while writing it, so it is incomplete and cannot be resumed); {advice}")
