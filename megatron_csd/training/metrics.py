"""Run metrics: global reduction of the loss function's statistics and their sinks.

``reduce_loss_stats`` turns the per-microbatch ``{name: [sum, count]}`` dicts that the schedule
collects on the last pipeline stage into global per-token means. Only last-stage ranks with
TP rank 0 contribute (TP ranks hold identical values; other stages hold none), and one SUM
all-reduce over the whole world gives every rank the same numbers (so any rank may log).

``MetricsWriter`` (logging rank only) appends one JSON object per record to
``OUTPUT_DIR/metrics.jsonl`` (``resume``: appending, the run resumes this output dir's own
latest; otherwise an existing file is first renamed to ``metrics.jsonl.previous``, or
``.previous.2``, ``.3``, ... when taken: no earlier file is ever replaced), prints a console line, and mirrors scalars to TensorBoard when
asked and importable.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def reduce_loss_stats(outputs: Sequence[dict], names: Sequence[str], *, contributes: bool,
                      device: torch.device) -> dict[str, float]:
    """Global ``sum / count`` per metric name (0.0 when no response token was seen) + ``tokens``."""
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    if contributes:
        for output in outputs:
            for i, name in enumerate(names):
                totals[i] += output[name].detach().to(torch.float64).to(device)
    dist.all_reduce(totals)
    return {name: (totals[i, 0] / totals[i, 1]).item() if totals[i, 1] > 0 else 0.0
            for i, name in enumerate(names)} | {"tokens": totals[0, 1].item()}


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def _unused_name(base: str) -> str:
    """``base``, or ``base.2``, ``base.3``, ... : the first name that does not exist yet."""
    name, count = base, 1
    while os.path.exists(name):
        count += 1
        name = f"{base}.{count}"
    return name


class MetricsWriter:
    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool, quiet: bool,
                 resume: bool):
        self.enabled = enabled
        self.quiet = quiet
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.rename(self.path, _unused_name(self.path + ".previous"))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as err:  # tensorboard is an optional extra
                print(f"[megatron_csd] TensorBoard requested but unavailable ({err}); "
                      "install the 'tensorboard' extra. Continuing without it.", file=sys.stderr)
            else:
                self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, record: dict, *, console: Optional[str] = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and math.isfinite(value):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)
        if not self.quiet:
            text = console or "  ".join(f"{k} {_format(v)}" for k, v in record.items())
            print(text, flush=True)

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
