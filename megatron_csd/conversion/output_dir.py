"""Atomic output folders: build in a hidden sibling temp folder, publish at the end with a manifest.

A crash or an error mid-conversion leaves no folder at the target path that could be
mistaken for a good checkpoint. Every published folder carries ``manifest.json`` (sizes and
CRC-32 of its files, models/manifest.py), written into the temp folder before it is published.

An existing non-empty target is refused unless `force`. With `force` only what a converter
wrote is replaced, never a file the user put there: the entries the new output has (same
top-level names) and the files the previous output's manifest lists are moved aside, the new
entries moved in (the manifest last, so a folder caught half-way has no manifest of the new
files), and the old copies deleted. Everything else stays, and is listed on stderr.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Union

from megatron_csd.models.manifest import MANIFEST_FILE, CheckpointDamagedError, read_manifest, write_manifest


def check_output_dir(out_dir: Union[str, os.PathLike], force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"output directory {out} is not empty; choose a new one or pass --force "
                         "to replace the files a converter writes there (other files are kept)")
    return out


def _previous_output_files(out: Path) -> list[str]:
    """Relative paths the earlier conversion into `out` wrote, per its manifest ([] if none)."""
    try:
        manifest = read_manifest(out)
    except CheckpointDamagedError:
        return []
    return [] if manifest is None else [MANIFEST_FILE] + list(manifest["files"])


def _merge_into(out: Path, tmp: Path) -> list[str]:
    """Replace in `out` what the old and new outputs hold; returns the kept (foreign) entries."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    # The manifest first (out is never left with a stale one), then whole top-level entries
    # the new output replaces, then the rest of what the old manifest lists (stale shards).
    ours = [MANIFEST_FILE] + sorted(p.name for p in tmp.iterdir()) + _previous_output_files(out)
    for relative in dict.fromkeys(ours):
        source = out / relative
        if source.exists() or source.is_symlink():
            target = old / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST_FILE):
        os.replace(entry, out / entry.name)
    tmp.rmdir()
    shutil.rmtree(old, ignore_errors=True)
    manifest = read_manifest(out) or {"files": {}}
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE
                  and p.relative_to(out).as_posix() not in manifest["files"])


@contextlib.contextmanager
def atomic_output_dir(out_dir: Union[str, os.PathLike], force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it (with a manifest) becomes `out_dir`, on error it is deleted."""
    out = check_output_dir(out_dir, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() and any(out.iterdir()):
        kept = _merge_into(out, tmp)
        if kept:
            print(f"--force: kept {len(kept)} file(s) in {out} that the converter did not write: "
                  f"{', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}", file=sys.stderr)
        return
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
