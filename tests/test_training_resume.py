"""Exact resume across processes, and a two-node launch emulated with two torchrun commands.

Run A (one torchrun, 2 ranks, TP=2, CSD distillation) trains 4 iterations straight and saves
at iteration 2 on the way. Run B is a fresh pair of processes started as TWO torchrun
invocations on localhost (``--nnodes 2``, node ranks 0 and 1, one rank each: the same TP=2
layout spread over two "nodes"); it loads A's iteration-2 checkpoint and trains iterations 3-4.
B must reproduce A's losses, grad norms, learning rates and final validation bitwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.spawn import free_port
from tests.test_training_common import build_workspace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_config(workspace: dict, path: str) -> None:
    from megatron_csd.training.config_io import config_from_dict, save_resolved_config

    config = config_from_dict({
        "mode": "distill", "device": "cpu", "precision": "fp32",
        "student": {"preset": "tiny-gemma", "overrides": {"hidden_size": 32, "ffn_hidden_size": 64,
                                                          "num_attention_heads": 2, "kv_channels": 16,
                                                          "hidden_dropout": 0.1}},
        "teacher": {"preset": "tiny-gemma"},
        "parallel": {"tensor_model_parallel_size": 2},
        "optimizer": {"lr": 3e-3, "lr_warmup_iters": 1, "clip_grad": 0.5},
        "training": {"train_iters": 4, "global_batch_size": 4, "micro_batch_size": 2,
                     "seq_length": 32, "eval_samples": 8, "eval_at_start": False, "packing": False},
        "data": {"train_path": workspace["train"], "valid_path": workspace["valid"],
                 "tokenizer": workspace["tokenizer"]},
        "checkpoint": {"save_interval": 2},
        "logging": {"quiet": True},
    })
    directory = os.path.dirname(path)
    written = save_resolved_config(config, directory)
    os.replace(written, path)


def _torchrun(args: list, *, nnodes: int = 1, node_rank: int = 0, nproc: int, port: int):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
               "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "megatron_csd.training.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return output


def _records(output_dir: str) -> list:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_resume_on_two_emulated_nodes_reproduces_the_straight_run_bitwise(tmp_path):
    workspace = build_workspace(str(tmp_path))
    config_path = str(tmp_path / "run.yaml")
    _write_config(workspace, config_path)
    run_a, run_b = str(tmp_path / "a"), str(tmp_path / "b")

    _finish(_torchrun(["--config", config_path, "--output-dir", run_a], nproc=2, port=free_port()))
    checkpoint = os.path.join(run_a, "checkpoints", "iter_0000002")
    assert os.path.isfile(os.path.join(checkpoint, "model", "metadata.json"))

    port = free_port()
    nodes = [_torchrun(["--config", config_path, "--output-dir", run_b, "--load", checkpoint],
                       nnodes=2, node_rank=rank, nproc=1, port=port) for rank in (0, 1)]
    outputs = [_finish(proc) for proc in nodes]
    assert "resumed from" in outputs[0]

    straight = [r for r in _records(run_a) if r["split"] == "train"]
    resumed = [r for r in _records(run_b) if r["split"] == "train"]
    assert [r["iteration"] for r in resumed] == [3, 4]
    for want, got in zip(straight[2:], resumed):
        for key in ("loss", "ce", "kd", "grad_norm", "lr"):
            assert got[key] == want[key], (key, want, got)
    valid_a = [r for r in _records(run_a) if r["split"] == "valid"][-1]
    valid_b = [r for r in _records(run_b) if r["split"] == "valid"][-1]
    assert valid_a == valid_b
    with open(os.path.join(run_b, "checkpoints", "latest")) as handle:
        assert handle.read().strip() == "iter_0000004"


def _distributed_optimizer_resume(rank, world_size, workspace, out_file):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training
    from tests.test_training_common import tiny_config

    def config(output_dir, **checkpoint):
        return tiny_config(workspace, output_dir, mode="sft", train_iters=4, global_batch_size=4,
                           micro_batch_size=1,
                           student={"checkpoint": None, "preset": "tiny-gemma"},
                           optimizer={"use_distributed_optimizer": True},
                           checkpoint={"save_interval": 2, **checkpoint})

    straight = run_training(config(os.path.join(workspace["root"], "dist_a")))
    destroy_parallel()
    load = os.path.join(workspace["root"], "dist_a", "checkpoints", "iter_0000002")
    resumed = run_training(config(os.path.join(workspace["root"], "dist_b"), load=load))
    destroy_parallel()
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump({"straight": straight.train_losses, "resumed": resumed.train_losses,
                       "valid": [straight.validation[-1], resumed.validation[-1]]}, handle)


@pytest.mark.slow
def test_distributed_optimizer_resumes_bitwise(tmp_path):
    """The GPU default (Megatron's DistributedOptimizer, state sharded over DP=2) resumes exactly.

    Regression test: with megatron-core 0.16.1's torch-AdamW path the Adam step count came back
    wrong after a load (the first update after resuming matched, the second did not).
    """
    from tests.spawn import run_distributed

    workspace = build_workspace(str(tmp_path))
    out_file = str(tmp_path / "dist_opt.json")
    run_distributed(_distributed_optimizer_resume, 2, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    assert len(record["straight"]) == 4 and len(record["resumed"]) == 2
    assert record["resumed"] == record["straight"][2:]
    assert record["valid"][0] == record["valid"][1]
