"""`bash examples/distill_gemma.sh` end to end: the embedded default, shortened.

Same steps as the real default (toy data + tokenizer, SFT of the tiny Gemma teacher with DP=2,
CSD distillation into the smaller student at TP=2 on gloo), with fewer records and iterations.
Checks the script's promises: before/after held-out losses printed (and the student's
held-out response CE went down), checkpoint and metrics written where it says, the distilled
student checkpoint in the model-only layout and exportable to a Hugging Face model that loads;
every launch goes through ``$PYTHON``; a foreign EMBEDDED_DIR is never deleted.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def _python_wrapper(tmp_path) -> tuple[str, str]:
    """A PYTHON that logs its arguments, then runs this interpreter."""
    log = tmp_path / "python_calls.log"
    wrapper = tmp_path / "logging_python"
    wrapper.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return str(wrapper), str(log)


def test_embedded_default_refuses_to_delete_a_foreign_directory(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    env = dict(os.environ, EMBEDDED_DIR=str(foreign), CUDA_VISIBLE_DEVICES="")
    env.pop("TEACHER", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "distill_gemma.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "was not made by this script" in proc.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_embedded_default_runs_end_to_end(tmp_path):
    python, python_log = _python_wrapper(tmp_path)
    work = tmp_path / "default"
    work.mkdir()  # an existing empty directory is fine to use
    env = dict(os.environ, EMBEDDED_DIR=str(work), EMBEDDED_TEACHER_ITERS="4",
               EMBEDDED_STUDENT_ITERS="3", EMBEDDED_NUM_TRAIN="300", EMBEDDED_EVAL_SAMPLES="16",
               CUDA_VISIBLE_DEVICES="", PYTHON=python)
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
    # Distillation helped the student on held-out data.
    assert valid[-1]["ce"] < valid[0]["ce"]
    # Both launches used $PYTHON (torch.distributed.run), not a torchrun found on PATH.
    with open(python_log) as handle:
        launches = [line for line in handle if line.startswith("-m torch.distributed.run")]
    assert len(launches) == 2
    # The distilled student exports to a Hugging Face folder that transformers loads and runs.
    _check_export_loads(os.path.dirname(checkpoint), str(tmp_path / "hf"))


def _check_export_loads(save_dir: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    convert_megatron_to_hf(save_dir, out_dir)  # via `latest`
    model = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = model(torch.tensor([[2, 10, 11, 12]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()
