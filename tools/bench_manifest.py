#!/usr/bin/env python3
"""Cost of checkpoint manifests: write a >= 1 GiB checkpoint, then time the manifest.

    python tools/bench_manifest.py [--size-gib 1.0] [--dir /scratch] [--repeats 3]

The checkpoint is a torch DCP (torch_dist) folder as Megatron's dist_checkpointing writes it
(``FileSystemWriter``, fsync on), holding fp32 tensors of 64 MiB. Timed per repeat: the save,
``write_manifest`` (sizes + streamed CRC-32 of every file) and ``verify_manifest`` (sizes,
then CRC-32 again). Both read the files just written, so they usually come from the page
cache (a load from cold storage reads them once more). Prints MB/s, the manifest's overhead
relative to the save time, and the machine load (``uptime``): numbers from a busy machine
are upper bounds of the cost, re-measure on an idle one.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_csd.models.manifest import verify_manifest, write_manifest  # noqa: E402


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def _save(state: dict, directory: Path) -> float:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    start = time.perf_counter()
    dcp_save(state, storage_writer=FileSystemWriter(str(directory), sync_files=True, thread_count=1))
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size (default 1 GiB)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    chunk = 16 * 1024 * 1024  # fp32 elements = 64 MiB per tensor
    count = max(1, round(args.size_gib * 1024 ** 3 / (4 * chunk)))
    generator = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(chunk, generator=generator) for i in range(count)}
    total = sum(t.numel() * t.element_size() for t in state.values())
    root = Path(tempfile.mkdtemp(prefix="bench_manifest_", dir=args.dir))
    print(f"load before: {_uptime()}")
    rows = []
    try:
        for repeat in range(args.repeats):
            directory = root / f"ckpt{repeat}"
            save_s = _save(state, directory)
            start = time.perf_counter()
            write_manifest(directory)
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            assert verify_manifest(directory) is None
            verify_s = time.perf_counter() - start
            rows.append((save_s, write_s, verify_s))
            print(f"repeat {repeat}: save {save_s:.2f}s  manifest write {write_s:.2f}s  "
                  f"verify {verify_s:.2f}s", flush=True)
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save_s, write_s, verify_s = (statistics.median(column) for column in zip(*rows))
    mb = total / 1e6
    print(f"checkpoint {total / 1024 ** 3:.2f} GiB in {count} tensors; medians of {len(rows)}:")
    print(f"  save (DCP, fsync)   {save_s:7.2f} s  {mb / save_s:8.0f} MB/s")
    print(f"  manifest write      {write_s:7.2f} s  {mb / write_s:8.0f} MB/s  "
          f"= {100 * write_s / save_s:.1f}% of the save time")
    print(f"  manifest verify     {verify_s:7.2f} s  {mb / verify_s:8.0f} MB/s  "
          f"= {100 * verify_s / save_s:.1f}% of the save time")
    print(f"load after: {_uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
