"""``metrics.jsonl`` upkeep on resume: one record per iteration.

A run killed after its last checkpoint has already logged the iterations between that
checkpoint and the kill; the resumed run logs them again. On resume from iteration N the
records with ``iteration > N`` (the stale tail of the interrupted run) are dropped, by writing
the kept lines to a temporary file in the same folder, fsync, and one ``os.replace`` (a crash
at any point leaves either the old or the new file, never a mix). Lines are kept byte for
byte; a torn last line (a kill in the middle of a write) is dropped; any other line that is
not a JSON object with an ``iteration`` is kept as it is.
"""
from __future__ import annotations

import json
import os


def _iteration(line: str):
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("iteration") if isinstance(record, dict) else None


def drop_records_after(path: str, iteration: int) -> int:
    """Drop records of ``path`` with ``iteration > iteration`` atomically; returns how many went."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    kept = []
    for index, line in enumerate(lines):
        step = _iteration(line)
        torn = index == len(lines) - 1 and not line.endswith("\n") and step is None
        if torn or (isinstance(step, int) and step > iteration):
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(kept)
    if dropped == 0:
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(kept)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return dropped


def trim_metrics_after_resume(writer, iteration: int) -> None:
    """On the logging rank: drop the stale tail of ``writer``'s metrics.jsonl, and say so."""
    if not writer.enabled:
        return
    dropped = drop_records_after(writer.path, iteration)
    if dropped:
        writer.print(f"[megatron_csd] {writer.path}: dropped {dropped} record(s) after iteration "
                     f"{iteration} (logged by the interrupted run; they are recomputed now)")
