"""Damaged trainer checkpoints are detected on resume (issue 8, item 5).

One short run saves iter_1 and iter_2; copies of it are then damaged and resumed (the re-run
without --load resumes from latest = iter_2):
- 8 KiB zeroed in the middle of the model shard (size unchanged) -> one clear error naming
  the file (it used to load silently);
- the same with --no-verify-checkpoint -> loads and trains (the opt-out);
- manifest.json removed (a checkpoint from before manifests) -> loads, with a one-line notice;
- a truncated shard, through the command line -> exit 2 and one error line, no EOFError
  traceback (it used to be a 251-line traceback).
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil

import pytest

from tests.reliability.helpers import cli_args, run_cli, sft_config
from tests.spawn import run_distributed
from tests.test_training_common import build_workspace


def _model_shard(run_dir: str) -> str:
    shards = glob.glob(os.path.join(run_dir, "checkpoints", "iter_0000002", "model", "*.distcp"))
    return max(shards, key=os.path.getsize)


def _zero_middle(path: str) -> None:
    size = os.path.getsize(path)
    assert size > 3 * 8192, size
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(b"\0" * 8192)
    assert os.path.getsize(path) == size


def _variant(run: str, name: str) -> str:
    copy = os.path.join(os.path.dirname(run), name)
    shutil.copytree(run, copy)
    return copy


def _resume(config):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            outcome = run_training(config)
            outcome = {"losses": outcome.train_losses}
        except ValueError as error:
            outcome = {"error": f"{type(error).__name__}: {error}"}
        finally:
            destroy_parallel()
    outcome["stderr"] = err.getvalue()
    return outcome


def _scenarios(rank, world_size, workspace, out_file):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    run = os.path.join(workspace["root"], "run")
    run_training(sft_config(workspace, run, train_iters=2))
    destroy_parallel()
    zeroed, opt_out, old = (_variant(run, name) for name in ("zeroed", "opt_out", "old"))
    truncated = _variant(run, "truncated")
    for directory in (zeroed, opt_out):
        _zero_middle(_model_shard(directory))
    os.truncate(_model_shard(truncated), os.path.getsize(_model_shard(truncated)) // 2)
    os.remove(os.path.join(old, "checkpoints", "iter_0000002", "manifest.json"))
    record = {
        "manifest": sorted(json.load(open(os.path.join(run, "checkpoints", "iter_0000002",
                                                       "manifest.json")))["files"]),
        "zeroed_shard": _model_shard(zeroed),
        "zeroed": _resume(sft_config(workspace, zeroed, train_iters=3)),
        "opt_out": _resume(sft_config(workspace, opt_out, train_iters=3, no_verify_checkpoint=True)),
        "old": _resume(sft_config(workspace, old, train_iters=3)),
    }
    with open(out_file, "w") as handle:
        json.dump(record, handle)


@pytest.mark.slow
def test_damaged_checkpoints_are_one_clear_error_and_old_ones_still_load(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    out_file = str(tmp_path / "result.json")
    run_distributed(_scenarios, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    # The manifest covers the model, the optimizer, the RNG states and the trainer state.
    for prefix in ("model/", "optimizer/", "rng/rank_00000.pt", "trainer_state.json", "model_config.json"):
        assert any(name.startswith(prefix) for name in record["manifest"]), prefix

    error = record["zeroed"]["error"]
    assert error.startswith("CheckpointDamagedError: checkpoint file " + record["zeroed_shard"])
    assert "changed since it was saved" in error and "--no-verify-checkpoint" in error
    assert len(record["opt_out"].get("losses", [])) == 1, record["opt_out"]  # the opt-out loads it anyway
    assert len(record["old"]["losses"]) == 1
    assert "no manifest.json" in record["old"]["stderr"]

    # The command line: a truncated shard is exit 2 and one error line, no traceback.
    truncated = str(tmp_path / "truncated")
    result = run_cli(cli_args(workspace, truncated, train_iters=3))
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("megatron_csd: error")]
    assert len(errors) == 1 and "is truncated" in errors[0] and "iter_0000002" in errors[0]
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
