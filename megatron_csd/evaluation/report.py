"""Writing an evaluation: the console table, ``results.json`` and the generations JSONL files.

Output folder layout (``--output-dir DIR``)::

    DIR/results.json                 settings, per-file metrics and their average (see README)
    DIR/generations_<name>.jsonl     one line per (seed, prompt): file, index, seed, prompt,
                                     reference, completion, completion_ids, finish_reason

An evaluation never overwrites: if any of the files it would write exists already, it stops
before generating (``check_output_dir``) and says so. Files are written to ``*.tmp`` and
renamed, so an interrupted run leaves no half-written result under the final name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from megatron_csd.evaluation.summary import METRIC_NAMES

RESULTS_FILE = "results.json"
_HEADERS = {"rougeL": "ROUGE-L", "exact_match": "EM", "response_loss": "resp. loss",
            "gen_length": "gen len", "distinct_1": "dist-1", "distinct_2": "dist-2",
            "self_bleu": "self-BLEU"}


def generations_file(name: str) -> str:
    return f"generations_{name}.jsonl"


def output_paths(output_dir: str, names: Sequence[str]) -> list[Path]:
    root = Path(output_dir)
    return [root / RESULTS_FILE] + [root / generations_file(name) for name in names]


def check_output_dir(output_dir: str, names: Sequence[str]) -> None:
    """ValueError when an earlier evaluation's files are in the way (nothing is overwritten)."""
    existing = [str(p) for p in output_paths(output_dir, names) if p.exists()]
    if existing:
        raise ValueError(f"{output_dir} already holds evaluation results ({', '.join(existing)}); "
                         "choose another --output-dir (nothing is overwritten)")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ValueError(f"--output-dir {output_dir} exists and is not a directory")


def _write_atomic(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "x", encoding="utf-8") as handle:  # "x": never clobber, not even a stale tmp
        handle.writelines(lines)
    os.replace(tmp, path)


def write_generations(path, generations: Sequence[dict]) -> None:
    _write_atomic(Path(path), [json.dumps(g, ensure_ascii=False) + "\n" for g in generations])


def write_results(result, output_dir: str) -> list[str]:
    """results.json + one generations file per test file; returns the paths written."""
    check_output_dir(output_dir, list(result.files))
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, file_result in result.files.items():
        path = root / generations_file(name)
        write_generations(path, file_result.generations)
        written.append(str(path))
    path = root / RESULTS_FILE
    _write_atomic(path, [json.dumps(result.to_json(), indent=2) + "\n"])
    written.insert(0, str(path))
    return written


def _cell(metric: dict) -> str:
    mean, std = metric.get("mean"), metric.get("std")
    if mean is None:
        return "-"
    return f"{mean:.3f}" if not std else f"{mean:.2f}±{std:.2f}"


def format_table(result) -> str:
    """Plain-text table: one row per file and one for the average, mean±std across seeds."""
    header = ["file", "prompts"] + [_HEADERS[name] for name in METRIC_NAMES]
    rows = [[name, str(f.num_prompts)] + [_cell(f.metrics[m]) for m in METRIC_NAMES]
            for name, f in result.files.items()]
    total = sum(f.num_prompts for f in result.files.values())
    rows.append(["average", str(total)] + [_cell(result.average[m]) for m in METRIC_NAMES])
    widths = [max(len(row[c]) for row in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if c else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    seeds = ", ".join(str(s) for s in result.settings.seeds)
    lines.append(f"(mean±std over seeds {seeds}; ROUGE-L, EM, distinct-n, self-BLEU x100; "
                 "response loss in nats/token, gen len in tokens)")
    return "\n".join(lines)
