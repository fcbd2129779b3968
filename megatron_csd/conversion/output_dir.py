"""Atomic output folders: build in a hidden sibling temp folder, rename into place at the end.

A crash or an error mid-conversion leaves no folder at the target path that could be
mistaken for a good checkpoint; an existing non-empty target is refused unless `force`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Union


def check_output_dir(out_dir: Union[str, os.PathLike], force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"output directory {out} is not empty; choose a new one or pass --force "
                         "to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out_dir: Union[str, os.PathLike], force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `out_dir`, on error it is deleted."""
    out = check_output_dir(out_dir, force).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
