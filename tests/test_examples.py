"""`bash examples/distill_gemma.sh` end to end: the embedded default, shortened.

Same steps as the real default (toy data + tokenizer, SFT of the tiny Gemma teacher with DP=2,
CSD distillation into the smaller student at TP=2 on gloo), with fewer records and iterations.
Checks the script's promises: before/after held-out losses printed (and the student's
held-out response CE went down), checkpoint and metrics written where it says, the distilled
student checkpoint in the model-only layout and exportable to a Hugging Face model that loads;
every launch goes through ``$PYTHON``; a foreign EMBEDDED_DIR is never deleted; a second run
re-uses the finished data and teacher stages, distils into a new directory and keeps every file
(a user's included); none of the known-harmless upstream warnings reaches the console, and the
exported folder's tokenizer loads in transformers and matches the project's tokenizer.
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
    proc = _run_script(env)
    out = proc.stdout
    assert "held-out response CE (sft model)" in out  # the teacher's fine-tuning, labelled by role
    assert "held-out response CE (student)" in out
    _check_no_known_noise(proc.stderr)
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
    _check_export_loads(os.path.dirname(checkpoint), str(tmp_path / "hf"),
                        str(work / "data" / "tokenizer.model"))

    # A second run keeps everything: the user's files, the first student; it re-uses the data
    # and the teacher (one launch only) and distils into a new directory.
    (work / "notes.txt").write_text("keep me")
    (work / "teacher_sft" / "my_eval.txt").write_text("mine")
    first_files = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    again = _run_script(env).stdout
    assert f"== data: re-using {work}/data (finished earlier with the same settings)" in again
    assert f"== teacher: re-using {work}/teacher_sft (finished earlier with the same settings)" in again
    assert f"== student: writing {work}/distill_run2 (new directory;" in again
    assert re.findall(r"\[megatron_csd\] checkpoint: (\S+)", again)[-1].endswith(
        "distill_run2/checkpoints/iter_0000003")
    assert (work / "notes.txt").read_text() == "keep me"
    assert (work / "teacher_sft" / "my_eval.txt").read_text() == "mine"
    assert set(first_files) <= {str(p.relative_to(work)) for p in work.rglob("*")}
    with open(python_log) as handle:
        assert sum(line.startswith("-m torch.distributed.run") for line in handle) == 3


def test_embedded_default_does_not_reuse_an_unfinished_stage(tmp_path):
    """A stage dir without a matching completion marker is never re-used nor touched."""
    work = tmp_path / "default"
    (work / "data").mkdir(parents=True)
    (work / ".megatron_csd_embedded_default").touch()
    (work / "data" / "train.jsonl").write_text("half-written\n")  # a crashed first run
    env = dict(os.environ, EMBEDDED_DIR=str(work), EMBEDDED_NUM_TRAIN="50", CUDA_VISIBLE_DEVICES="",
               PYTHON="false")  # stop at the first launch: only the directory choice matters here
    env.pop("TEACHER", None)
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "distill_gemma.sh")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert f"== data: writing {work}/data_run2 (new directory;" in proc.stdout
    assert (work / "data" / "train.jsonl").read_text() == "half-written\n"


def _run_script(env):
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "distill_gemma.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_no_known_noise(stderr: str) -> None:
    from megatron_csd.training.warning_filters import CPU_ONLY_WARNINGS, KNOWN_UPSTREAM_WARNINGS

    for _, message in KNOWN_UPSTREAM_WARNINGS + CPU_ONLY_WARNINGS:
        assert not re.search(message, stderr), message
    assert "Warning:" not in stderr, stderr[-3000:]
    # One line per launch (rank 0 only) instead of a dozen per rank.
    note = "Transformer Engine and Apex not installed: optional GPU extras"
    assert stderr.count(note) == 2, stderr[-3000:]


def _check_export_loads(save_dir: str, out_dir: str, tokenizer_file: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_csd.data.tokenizer import load_tokenizer

    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    convert_megatron_to_hf(save_dir, out_dir)  # via `latest`
    model = AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = model(torch.tensor([[2, 10, 11, 12]])).logits
    assert logits.shape[:2] == (1, 4) and torch.isfinite(logits).all()
    # The tokenizer loads too (tokenizer.json written by the export) and agrees with ours.
    hf_tokenizer, ours = AutoTokenizer.from_pretrained(out_dir), load_tokenizer(tokenizer_file)
    for text in ("What is the capital of France?", "Reverse: one two  three\n", "12 + 30 = 42"):
        ids = ours.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == ours.decode(ids) == text
