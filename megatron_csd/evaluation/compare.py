"""Comparison of training methods over training seeds: the report of examples/compare_objectives.sh.

    python -m megatron_csd.evaluation.compare --run-dir RUN --methods sft fkl csd_SS --seeds 1 2 3

Reads ``RUN/eval/<method>/seed<s>/results.json`` (one ``python -m megatron_csd.evaluation`` run
per trained student) and ``RUN/eval/teacher/results.json`` when present, and writes
``RUN/comparison.json``, ``RUN/comparison.md`` and ``RUN/comparison.png`` (refusing to overwrite).

Statistics. For student (method m, training seed s) let ``x_{m,s}`` be the evaluation's
``average[metric]["mean"]``: the metric averaged over the evaluation's sampling seeds (and test
files). The report gives, per method, ``mean = (1/n) sum_s x_{m,s}`` and the sample standard
deviation over training seeds ``std = sqrt(sum_s (x_{m,s} - mean)^2 / (n - 1))`` (``None`` for
n = 1), so the spread is the one between independently trained students, not the sampling
noise of one student (that is in each results.json). A missing results.json leaves the method
with fewer seeds and is listed under ``missing``; a non-finite value is an error, never a number.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

# JSON metric keys (those of results.json's "average") and the report's column titles.
COMPARE_METRICS = ("exact_match", "rougeL", "distinct_2", "self_bleu", "response_loss", "gen_length")
TITLES = {"exact_match": "accuracy (EM %)", "rougeL": "ROUGE-L", "distinct_2": "distinct-2",
          "self_bleu": "self-BLEU", "response_loss": "response loss", "gen_length": "gen len"}
REPORT_FILES = ("comparison.json", "comparison.md", "comparison.png")
TEACHER = "teacher"


def seed_stats(values: Sequence[float]) -> dict:
    """``{"mean", "std", "per_seed"}`` with the sample std (ddof 1; None for one value)."""
    values = list(values)
    if not values:
        return {"mean": None, "std": None, "per_seed": []}
    mean = math.fsum(values) / len(values)
    std = (math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
           if len(values) > 1 else None)
    return {"mean": mean, "std": std, "per_seed": values}


def read_result(path: Path) -> dict:
    """``{metric: value}`` from one results.json's ``average`` (value None: undefined there)."""
    with open(path, encoding="utf-8") as handle:
        average = json.load(handle)["average"]
    out = {}
    for name in COMPARE_METRICS:
        value = average[name]["mean"]
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{path}: {name} is {value}; a non-finite score cannot be compared "
                             "(look at that run's metrics.jsonl)")
        out[name] = value
    return out


def _method_entry(results: Sequence[dict], seeds: Sequence[int]) -> dict:
    metrics = {}
    for name in COMPARE_METRICS:
        values = [r[name] for r in results]
        # A metric undefined in any seed (self-BLEU with one sampling seed) stays undefined.
        metrics[name] = (seed_stats([]) | {"per_seed": values}) if None in values else seed_stats(values)
    return {"num_seeds": len(results), "seeds": list(seeds), "metrics": metrics}


def aggregate(run_dir: str, methods: Sequence[str], seeds: Sequence[int],
              settings: Optional[dict] = None) -> dict:
    """The comparison.json tree (see the module doc and the README's "Comparison of objectives");
    ``settings``: how the students were trained and evaluated, stored as given."""
    root = Path(run_dir) / "eval"
    out = {"run_dir": str(run_dir), "settings": dict(settings or {}), "methods": {}, "missing": [],
           "teacher": None, "std": "sample std over training seeds (ddof 1); null with one seed"}
    for method in methods:
        if method == TEACHER:
            raise ValueError(f"'{TEACHER}' is reserved for the teacher's evaluation; rename the method")
        results, done = [], []
        for seed in seeds:
            path = root / method / f"seed{seed}" / "results.json"
            if path.is_file():
                results.append(read_result(path))
                done.append(seed)
            else:
                out["missing"].append(str(path))
        out["methods"][method] = _method_entry(results, done)
    teacher = root / TEACHER / "results.json"
    if teacher.is_file():
        out["teacher"] = read_result(teacher)
    out["partial"] = bool(out["missing"])
    if not any(entry["num_seeds"] for entry in out["methods"].values()):
        raise ValueError(f"no results.json under {root}/<method>/seed<s>/ for methods "
                         f"{' '.join(methods)} and seeds {' '.join(map(str, seeds))}")
    return out


def _cell(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _digits(name: str) -> int:
    return 3 if name == "response_loss" else 2


def format_markdown(report: dict) -> str:
    """A Markdown table: one row per method (mean ± std over training seeds) and the teacher."""
    header = ["method", "seeds"] + [TITLES[name] for name in COMPARE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in report["methods"].items():
        cells = [_cell(entry["metrics"][name], _digits(name)) for name in COMPARE_METRICS]
        lines.append("| " + " | ".join([method, str(entry["num_seeds"])] + cells) + " |")
    if report["teacher"] is not None:
        cells = ["–" if report["teacher"][n] is None else f"{report['teacher'][n]:.{_digits(n)}f}"
                 for n in COMPARE_METRICS]
        lines.append("| " + " | ".join(["teacher", "–"] + cells) + " |")
    lines.append("")
    lines.append("Mean ± sample std (ddof 1) over training seeds of each student's score, itself "
                 "the mean over the evaluation's sampling seeds; EM, ROUGE-L, distinct-2, "
                 "self-BLEU x100 (self-BLEU: lower = more diverse); response loss in nats/token.")
    if report["partial"]:
        lines.append("")
        lines.append(f"PARTIAL: {len(report['missing'])} evaluation(s) missing: "
                     + ", ".join(report["missing"]))
    return "\n".join(lines) + "\n"


def write_report(report: dict, run_dir: str) -> list[str]:
    """comparison.json / .md / .png in ``run_dir``; refuses if any of them exists already."""
    from megatron_csd.evaluation.compare_plot import plot_comparison

    paths = [Path(run_dir) / name for name in REPORT_FILES]
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ValueError(f"{run_dir} already holds a comparison ({', '.join(existing)}); "
                         "nothing is overwritten: move them away or report into another run dir")
    for path, text in ((paths[0], json.dumps(report, indent=2) + "\n"), (paths[1], format_markdown(report))):
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
    plot_comparison(report, str(paths[2]))
    return [str(p) for p in paths]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_csd.evaluation.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the comparison's dir (holds eval/<method>/seed<s>/)")
    p.add_argument("--methods", nargs="+", required=True, help="method names, in table order")
    p.add_argument("--seeds", nargs="+", type=int, required=True, help="training seeds")
    p.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                   help="recorded under comparison.json's settings (repeatable)")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.run_dir):
            raise ValueError(f"--run-dir {args.run_dir} is not a directory")
        bad = [text for text in args.setting if "=" not in text]
        if bad:
            raise ValueError(f"--setting expects KEY=VALUE, got {bad[0]!r}")
        settings = dict(text.split("=", 1) for text in args.setting)
        report = aggregate(args.run_dir, args.methods, args.seeds, settings)
        written = write_report(report, args.run_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_markdown(report), end="")
    print("[compare] wrote " + ", ".join(written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
