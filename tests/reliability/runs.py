"""Helpers for the reliability tests that run the real trainer (this module holds no tests)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.spawn import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_STUDENT = {"hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2, "kv_channels": 16}


def config_tree(workspace: dict, output_dir: str, *, mode: str = "distill", tp: int = 1, **sections) -> dict:
    """A tiny preset-built run (no model checkpoints needed) over a tests.test_training_common workspace."""
    tree = {
        "mode": mode, "device": "cpu", "precision": "fp32",
        "student": {"preset": "tiny-gemma", "overrides": dict(TINY_STUDENT)},
        "teacher": {"preset": "tiny-gemma"} if mode == "distill" else {},
        "parallel": {"tensor_model_parallel_size": tp},
        "optimizer": {"lr": 3e-3, "lr_warmup_iters": 0, "lr_decay_style": "constant", "clip_grad": 1.0},
        "training": {"train_iters": 2, "global_batch_size": 2, "micro_batch_size": 1,
                     "seq_length": 32, "eval_samples": 2, "eval_at_start": False, "packing": False},
        "data": {"train_path": workspace["train"], "valid_path": workspace["valid"],
                 "tokenizer": workspace["tokenizer"]},
        "checkpoint": {"save": os.path.join(output_dir, "checkpoints")},
        "logging": {"output_dir": output_dir, "quiet": True},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def write_config(tree: dict, path: str) -> str:
    from megatron_csd.training.config_io import config_from_dict, save_resolved_config

    written = save_resolved_config(config_from_dict(tree), os.path.dirname(path))
    os.replace(written, path)
    return path


def torchrun(args: list, *, nproc: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m megatron_csd.training.cli ARGS`` on localhost."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               "-m", "megatron_csd.training.cli", *args]
    return subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def tree_digest(directory: str) -> dict:
    """{relative path: (size, crc32)} of every file under ``directory``."""
    import zlib

    digest = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                digest[os.path.relpath(path, directory)] = (os.path.getsize(path), zlib.crc32(handle.read()))
    return digest
