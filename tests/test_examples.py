"""`bash examples/distill_gemma.sh` end to end: the embedded default, shortened.

Same steps as the real default (toy data + tokenizer, SFT of the tiny Gemma teacher with DP=2,
CSD distillation into the smaller student at TP=2 on gloo), with fewer records and iterations.
Checks the script's promises: before/after held-out losses printed, checkpoint and metrics
written where it says, the distilled student checkpoint in the model-only layout.
"""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_embedded_default_runs_end_to_end(tmp_path):
    env = dict(os.environ, EMBEDDED_DIR=str(tmp_path / "default"), EMBEDDED_TEACHER_ITERS="4",
               EMBEDDED_STUDENT_ITERS="3", EMBEDDED_NUM_TRAIN="300", EMBEDDED_EVAL_SAMPLES="16",
               CUDA_VISIBLE_DEVICES="")
    env.pop("TEACHER", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "distill_gemma.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "held-out response CE (student)" in out
    assert re.search(r"held-out distillation loss \(csd TS\): [0-9.]+ -> [0-9.]+", out)
    checkpoint = re.findall(r"\[megatron_csd\] checkpoint: (\S+)", out)[-1]
    metrics = re.findall(r"\[megatron_csd\] metrics:\s+(\S+)", out)[-1]
    assert checkpoint.endswith("distill/checkpoints/iter_0000003")
    for name in ("model_config.json", "model/metadata.json", "optimizer/metadata.json",
                 "trainer_state.json", "tokenizer.model"):
        assert os.path.exists(os.path.join(checkpoint, name)), name
    with open(os.path.join(checkpoint, "model_config.json")) as handle:
        student = json.load(handle)
    assert student["family"] == "gemma" and student["hidden_size"] == 64
    with open(metrics) as handle:
        records = [json.loads(line) for line in handle]
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["iteration"] for r in train][-1] == 3
    assert valid[0]["iteration"] == 0 and valid[-1]["iteration"] == 3
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "teacher_forward_s"):
        assert key in train[-1]
    # The teacher was really trained first: its held-out CE is below the untrained student's.
    assert valid[0]["teacher_ce"] < valid[0]["ce"]
