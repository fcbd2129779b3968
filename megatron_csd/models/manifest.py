"""Checkpoint manifests: every file's size and CRC-32, written with the save, checked on load.

    DIR/manifest.json   {"format": "megatron_csd-manifest", "version": 1, "algorithm": "crc32",
                         "files": {"model/__0_0.distcp": {"size": 1234, "crc32": "9a3c01f2"}, ...}}

Writers (trainer checkpoints, converter outputs) call :func:`write_manifest` on the complete
temporary folder right before it is published (renamed into place), so a published folder
always carries its manifest. :func:`verify_manifest` first compares every listed file's size
(cheap: catches missing and truncated files), then streams each file through ``zlib.crc32``
in 4 MiB blocks, several files at once on a few threads (catches bytes changed with the
size intact, e.g. a zeroed block). Files
present but not listed (a user's notes) are ignored. A folder without a manifest (written
before manifests existed) is loadable; the caller prints a one-line notice.

:func:`verify_checkpoint` is the collective form (checkpoints live on a filesystem every rank
sees, as the atomic rename already assumes): each rank checks every size and checksums its
1/world share of the files, the outcomes are exchanged with ``all_gather_object``, and every
rank raises the same one-line error together.
"""
from __future__ import annotations

import json
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

MANIFEST_FILE = "manifest.json"
FORMAT_NAME = "megatron_csd-manifest"
FORMAT_VERSION = 1
BLOCK_BYTES = 4 * 1024 * 1024
_MAX_THREADS = 8  # files checksummed at once (one shard per rank: many files on big runs)
OPT_OUT_FLAG = "--no-verify-checkpoint"
# Folders of a trainer checkpoint that a model-only load (teacher, student, export) never reads.
TRAINING_STATE_PREFIXES = ("optimizer/", "rng/")

PathLike = Union[str, os.PathLike]


class CheckpointDamagedError(ValueError):
    """A file of a checkpoint is missing, truncated or changed since it was saved."""


def file_crc32(path: PathLike) -> str:
    """CRC-32 of a file's bytes (zlib), streamed in BLOCK_BYTES blocks, as 8 hex digits."""
    crc = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(BLOCK_BYTES)
            if not block:
                break
            crc = zlib.crc32(block, crc)
    return f"{crc & 0xFFFFFFFF:08x}"


def _crc_all(paths: list) -> list:
    """file_crc32 of each path, over a few threads (zlib releases the GIL on large blocks)."""
    if len(paths) < 2:
        return [file_crc32(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(_MAX_THREADS, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(file_crc32, paths))


def _listed_files(directory: Path) -> list[str]:
    names = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            relative = (Path(root) / name).relative_to(directory).as_posix()
            if relative != MANIFEST_FILE:
                names.append(relative)
    return names


def write_manifest(directory: PathLike) -> dict:
    """Checksum every file under ``directory`` into ``directory/manifest.json`` (atomically)."""
    directory = Path(directory)
    names = _listed_files(directory)
    crcs = _crc_all([directory / name for name in names])
    files = {name: {"size": (directory / name).stat().st_size, "crc32": crc}
             for name, crc in zip(names, crcs)}
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "algorithm": "crc32", "files": files}
    tmp = directory / (MANIFEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / MANIFEST_FILE)
    return manifest


def read_manifest(directory: PathLike) -> Optional[dict]:
    """The manifest of ``directory`` (None when it has none)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointDamagedError(f"{path} is damaged ({err}); {_ADVICE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointDamagedError(f"{path} is not a megatron_csd manifest; {_ADVICE}")
    return manifest


_ADVICE = ("the checkpoint cannot be trusted: resume from an earlier iter_* folder (--load "
           "SAVE/iter_N), re-convert / re-export it, or pass " + OPT_OUT_FLAG + " to load it "
           "anyway at your own risk")


def _damaged(path: Path, what: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f"checkpoint file {path} {what}; {_ADVICE}")


def verify_manifest(directory: PathLike, *, skip: Sequence[str] = (),
                    share: tuple[int, int] = (0, 1)) -> Optional[str]:
    """Check ``directory`` against its manifest; files whose path starts with ``skip`` are not read.

    Every listed file's size is checked; ``share = (index, count)`` checksums only that share
    of the files (largest first, dealt round-robin), for splitting the reads over ranks.
    Returns None when every file matches, a one-line notice when there is no manifest, and
    raises :class:`CheckpointDamagedError` naming the first bad file otherwise.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        return (f"{directory} has no {MANIFEST_FILE} (saved before checkpoints carried one, or "
                "not by the trainer or a converter): loading it without verification")
    files = {name: entry for name, entry in manifest["files"].items()
             if not any(name.startswith(prefix) for prefix in skip)}
    for name, entry in files.items():  # sizes first: missing or truncated files fail fast
        path = directory / name
        if not path.is_file():
            raise _damaged(path, "is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            kind = "truncated" if size < entry["size"] else "longer than saved"
            raise _damaged(path, f"is {kind}: {size} bytes, the manifest says {entry['size']}")
    index, count = share
    names = sorted(files, key=lambda name: (-files[name]["size"], name))[index::count]
    for name, crc in zip(names, _crc_all([directory / name for name in names])):
        if crc != files[name]["crc32"]:
            raise _damaged(directory / name, f"changed since it was saved (crc32 {crc}, the "
                                             f"manifest says {files[name]['crc32']})")
    return None


def verify_checkpoint(directory: PathLike, *, skip: Sequence[str] = (), enabled: bool = True) -> None:
    """Collective :func:`verify_manifest`: the ranks share the reads, every rank raises the same error.

    Every rank checks the sizes and checksums 1/world of the files (``share``); the outcomes
    are exchanged with ``all_gather_object`` and the first error (lowest rank) is raised on
    all ranks. Without an initialised process group it runs locally. The no-manifest notice
    goes to stderr once (rank 0).
    """
    if not enabled:
        return
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        outcome = ("notice", verify_manifest(directory, skip=skip, share=(rank, world)))
    except CheckpointDamagedError as err:
        outcome = ("error", str(err))
    outcomes = [outcome]
    if distributed:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, outcome)
    errors = [text for kind, text in outcomes if kind == "error"]
    if errors:
        raise CheckpointDamagedError(errors[0])
    if outcome[1] and rank == 0:
        print(f"[megatron_csd] note: {outcome[1]}", file=sys.stderr, flush=True)
