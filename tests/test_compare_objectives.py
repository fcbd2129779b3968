"""`bash examples/compare_objectives.sh`, shortened: the same steps as the real comparison (toy
data, teacher SFT, students trained per method and training seed, each evaluated with
``python -m megatron_csd.evaluation``, the report) with 1 method, 2 seeds, a few iterations and
prompts, one process per run. Checks the report's files, keys and values against the
evaluations it read, and that a second run writes a new directory and keeps the first intact.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "compare_objectives.sh")


def _env(tmp_path, **extra) -> dict:
    env = dict(os.environ, EMBEDDED_DIR=str(tmp_path / "embedded"), COMPARE_DIR=str(tmp_path / "cmp"),
               EMBEDDED_TEACHER_ITERS="2", EMBEDDED_NUM_TRAIN="200", EMBEDDED_EVAL_SAMPLES="8",
               STUDENT_ITERS="2", NPROC="1", EVAL_PROMPTS="4", EVAL_SEEDS="10 20",
               EVAL_MAX_NEW_TOKENS="4", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra)
    env.pop("TEACHER", None)
    return env


def _run(env) -> str:
    proc = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_compare_objectives_rejects_an_unknown_method(tmp_path):
    proc = subprocess.run(["bash", SCRIPT], env=_env(tmp_path, METHODS="fkl kl"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown method 'kl'" in proc.stderr
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "embedded").exists()


@pytest.mark.slow
def test_compare_objectives_shortened_end_to_end(tmp_path):
    out = _run(_env(tmp_path, METHODS="csd_SS", SEEDS="1 2"))
    run = tmp_path / "cmp"
    assert "load average" in out and "== compare_objectives: finished in" in out
    for name in ("comparison.json", "comparison.md", "comparison.png"):
        assert (run / name).is_file(), name
    assert (run / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((run / "comparison.json").read_text())
    assert list(report["methods"]) == ["csd_SS"] and report["missing"] == [] and not report["partial"]
    assert report["settings"]["student_iters"] == "2" and report["settings"]["eval_seeds"] == "10 20"
    entry = report["methods"]["csd_SS"]
    assert entry["num_seeds"] == 2 and entry["seeds"] == [1, 2]
    for name in ("exact_match", "rougeL", "distinct_2", "self_bleu", "response_loss", "gen_length"):
        stats = entry["metrics"][name]
        per_seed = [json.loads((run / "eval/csd_SS" / f"seed{s}" / "results.json").read_text())
                    ["average"][name]["mean"] for s in (1, 2)]
        assert stats["per_seed"] == per_seed and all(math.isfinite(v) for v in per_seed)
        assert stats["mean"] == pytest.approx(statistics.mean(per_seed))
        assert stats["std"] == pytest.approx(statistics.stdev(per_seed))
    # The two seeds really trained different students (init and data order differ).
    assert entry["metrics"]["response_loss"]["per_seed"][0] != entry["metrics"]["response_loss"]["per_seed"][1]
    assert 0 < report["teacher"]["response_loss"] < entry["metrics"]["response_loss"]["mean"]
    table = (run / "comparison.md").read_text()
    assert table.startswith("| method | seeds |") and "| csd_SS | 2 |" in table and "| teacher |" in table

    # A second run re-uses data and teacher, writes cmp_run2 and keeps every earlier file as it was.
    first = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".lock"}
    again = _run(_env(tmp_path, METHODS="fkl", SEEDS="3"))
    assert "== teacher: re-using" in again and f"== comparison: writing {run}_run2 (new directory;" in again
    assert json.loads((tmp_path / "cmp_run2" / "comparison.json").read_text())["methods"]["fkl"]["num_seeds"] == 1
    for path, data in first.items():
        assert path.read_bytes() == data, path
