"""The evaluation CLI end to end with the real generator on a tiny converted-layout checkpoint:
``tools/evaluate.py`` in a subprocess (TP1, DP1) against the same command at DP 2 (identical
results files), TP 2 and PP 2 (identical generations, loss to rtol 1e-5) in a 2-process world."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluation.common import build_eval_workspace, save_tiny_model
from tests.spawn import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _args(workspace, out_dir, *extra):
    return ["--load", workspace["model"], "--test-file", f"toy={workspace['valid']}",
            "--num-samples", "4", "--seeds", "10", "20",
            "--max-new-tokens", "6", "--batch-size", "3", "--device", "cpu", "--quiet",
            "--output-dir", out_dir, *extra]


def _cli_in_world(rank, world_size, workspace, runs):
    from megatron_csd.evaluation.cli import main

    for out_dir, extra in runs:
        assert main(_args(workspace, out_dir, *extra)) == 0


@pytest.mark.slow
def test_cli_end_to_end_and_layout_independent(tmp_path):
    workspace = build_eval_workspace(tmp_path)
    run_distributed(save_tiny_model, 1, workspace)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ref_dir = str(tmp_path / "ref")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *_args(workspace, ref_dir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROUGE-L" in proc.stdout and "average" in proc.stdout and "results.json" in proc.stdout
    runs = [(str(tmp_path / "dp2"), []), (str(tmp_path / "tp2"), ["--tensor-model-parallel-size", "2"]),
            (str(tmp_path / "pp2"), ["--pipeline-model-parallel-size", "2"])]
    run_distributed(_cli_in_world, 2, workspace, runs)

    def load(name):
        results = json.loads((tmp_path / name / "results.json").read_text())
        generations = {f: [json.loads(line) for line in open(tmp_path / name / f"generations_{f}.jsonl")]
                       for f in ("toy",)}
        return results, generations

    ref, ref_gen = load("ref")
    dp2, dp2_gen = load("dp2")
    assert dp2 == ref and dp2_gen == ref_gen, "DP 2 differs from DP 1"
    for layout in ("tp2", "pp2"):
        other, other_gen = load(layout)
        assert other_gen == ref_gen, f"{layout} sampled other tokens than TP 1"
        for name in ("toy",):
            got, want = other["files"][name]["metrics"], ref["files"][name]["metrics"]
            assert got["response_loss"]["mean"] == pytest.approx(want["response_loss"]["mean"], rel=1e-5)
            assert got["rougeL"] == want["rougeL"] and got["self_bleu"] == want["self_bleu"]
    # Real sampling: answers are non-trivial, the two seeds differ somewhere, lengths are bounded.
    toy = ref_gen["toy"]
    assert len(toy) == 8 and all(1 <= len(g["completion_ids"]) <= 6 for g in toy if g["finish_reason"] != "eos")
    assert [g["completion_ids"] for g in toy[:4]] != [g["completion_ids"] for g in toy[4:]]
    assert ref["files"]["toy"]["metrics"]["gen_length"]["mean"] == pytest.approx(
        sum(len(g["completion_ids"]) for g in toy) / 8)
