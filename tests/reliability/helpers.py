"""Shared builders for the reliability tests (this module holds no tests).

Runs use SFT on a small ``tiny-gemma`` student preset (no teacher, no model checkpoints to
write first), the toy workspace of tests/test_training_common.py, CPU, world of 1 or 2.
"""
from __future__ import annotations

import os
import subprocess
import sys

from tests.test_training_common import STUDENT_OVERRIDES, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sft_config(workspace: dict, output_dir: str, *, train_iters: int = 2, save_interval: int = 1,
               global_batch_size: int = 1, **checkpoint):
    """A 1-sequence-per-step SFT run saving every ``save_interval`` steps under output_dir."""
    return tiny_config(workspace, output_dir, mode="sft", train_iters=train_iters,
                       global_batch_size=global_batch_size, micro_batch_size=1,
                       student={"checkpoint": None, "preset": "tiny-gemma",
                                "overrides": dict(STUDENT_OVERRIDES)},
                       training={"eval_samples": 1, "eval_at_start": False},
                       checkpoint={"save_interval": save_interval, **checkpoint})


def cli_args(workspace: dict, output_dir: str, *, train_iters: int = 2, save_interval: int = 1,
             global_batch_size: int = 1) -> list:
    """The same run as :func:`sft_config`, as command-line flags of megatron_csd.training.cli."""
    args = ["--mode", "sft", "--device", "cpu", "--precision", "fp32", "--student-preset", "tiny-gemma"]
    for key, value in STUDENT_OVERRIDES.items():
        args += ["--student-override", f"{key}={value}"]
    args += ["--train-iters", str(train_iters), "--global-batch-size", str(global_batch_size),
             "--micro-batch-size", "1", "--seed", "11",  # sft_config's seed (tiny_config)
             "--seq-length", "32", "--eval-samples", "1", "--lr", "3e-3", "--lr-warmup-iters", "1",
             "--train-data", workspace["train"], "--valid-data", workspace["valid"],
             "--tokenizer", workspace["tokenizer"], "--output-dir", output_dir,
             "--save-interval", str(save_interval), "--eval-at-start", "false", "--quiet",
             "--no-packing"]  # as tiny_config
    return args


def env() -> dict:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def run_cli(args: list, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m megatron_csd.training.cli ARGS`` in a world of one (no torchrun)."""
    return subprocess.run([sys.executable, "-m", "megatron_csd.training.cli", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def listing(directory: str) -> dict:
    """relative path -> mtime_ns of every file under ``directory`` but the run lock."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name == "megatron_csd.lock":  # rewritten by every run that takes it
                continue
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = os.stat(path).st_mtime_ns
    return found
