"""A resume trains what the run trained: config.yaml is compared and never overwritten, and
metrics.jsonl is appended to only when the run resumes this output dir's own latest.

- relaunch with another objective: one-line refusal naming ``loss.objective``, nothing written;
- an allowed change (train_iters raised): resumes, config.yaml kept, the new config beside it;
- --overwrite-save: proceeds with the new objective, config.yaml still byte-identical;
- a fresh start rotates metrics.jsonl to an unused ``.previous*`` name (an earlier one is kept);
- --overwrite-save --load of another run's checkpoint: the old metrics are rotated, not trimmed.
"""
import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace

from .runs import config_tree


def _read(path):
    """The bytes of ``path`` (None when it does not exist)."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as handle:
        return handle.read()


def _train(workspace, run, train_iters, objective="csd", **checkpoint):
    """run_training in this process: (result or the refusal's text, listing of run after)."""
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.config_io import config_from_dict
    from megatron_csd.training.trainer import run_training

    config = config_from_dict(config_tree(
        workspace, run, mode="sft", training={"train_iters": train_iters}, loss={"objective": objective},
        checkpoint={"save_interval": 1, **checkpoint}))
    try:
        outcome = run_training(config)
    except ValueError as err:
        outcome = f"{type(err).__name__}: {err}"
    finally:
        destroy_parallel()
    return outcome


def _config_scenarios(rank, world_size, workspace, out_file):
    run = os.path.join(workspace["root"], "run")
    save = os.path.join(run, "checkpoints")
    _train(workspace, run, 2)
    original = _read(os.path.join(run, "config.yaml"))
    files_before = sorted(os.listdir(run)), sorted(os.listdir(save))
    refused = _train(workspace, run, 3, objective="fkl")
    files_after_refusal = sorted(os.listdir(run)), sorted(os.listdir(save))
    allowed = _train(workspace, run, 3)
    overwritten = _train(workspace, run, 4, objective="fkl", overwrite_save=True, load=save)
    resumed_config = (_read(os.path.join(run, "config.resume-3.yaml")) or b"").decode()
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        train = [json.loads(line)["iteration"] for line in handle if '"train"' in line]
    with open(out_file, "w") as handle:
        json.dump({
            "refused": refused, "untouched": files_before == files_after_refusal,
            "allowed_losses": allowed.train_losses, "overwritten_losses": overwritten.train_losses,
            "config_kept": _read(os.path.join(run, "config.yaml")) == original,
            "files": sorted(os.listdir(run)), "resumed_has_fkl": "objective: fkl" in resumed_config,
            "train_records": train,
        }, handle)


@pytest.mark.slow
def test_changed_objective_is_refused_and_config_yaml_never_overwritten(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    out_file = str(tmp_path / "result.json")
    run_distributed(_config_scenarios, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    refused = record["refused"]
    assert refused.startswith("RunRefusedError: ") and "\n" not in refused, refused
    assert "loss.objective: 'csd' -> 'fkl'" in refused and "--overwrite-save" in refused
    assert "train_iters" not in refused  # an allowed change is not listed
    assert record["untouched"]
    assert len(record["allowed_losses"]) == 1  # train_iters raised: resumed from 2, one step
    assert len(record["overwritten_losses"]) == 1  # --overwrite-save: resumed from 3 with fkl
    assert record["config_kept"], "config.yaml of the run was overwritten"
    assert "config.resume-2.yaml" in record["files"] and "config.resume-3.yaml" in record["files"]
    assert record["resumed_has_fkl"]
    assert record["train_records"] == [1, 2, 3, 4]  # resumes of the own latest append


def _metrics_scenarios(rank, world_size, workspace, out_file):
    run, other = os.path.join(workspace["root"], "run"), os.path.join(workspace["root"], "other")
    _train(workspace, run, 2)
    earlier = os.path.join(run, "metrics.jsonl.previous")
    with open(earlier, "w") as handle:
        handle.write('{"iteration": 7, "note": "an earlier run"}\n')
    logged = _read(os.path.join(run, "metrics.jsonl"))
    _train(workspace, run, 1, overwrite_save=True)  # a fresh start in the same output dir
    after_fresh = _read(os.path.join(run, "metrics.jsonl"))
    _train(workspace, other, 1)
    _train(workspace, run, 2, overwrite_save=True, load=os.path.join(other, "checkpoints"))
    with open(out_file, "w") as handle:
        json.dump({
            "earlier_kept": _read(earlier) == b'{"iteration": 7, "note": "an earlier run"}\n',
            "first_rotated": _read(earlier + ".2") == logged,
            "fresh_rotated": _read(earlier + ".3") == after_fresh,
            "current": [json.loads(line)["iteration"] for line in
                        _read(os.path.join(run, "metrics.jsonl")).decode().splitlines()],
        }, handle)


@pytest.mark.slow
def test_metrics_are_rotated_unless_resuming_the_own_latest(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    out_file = str(tmp_path / "result.json")
    run_distributed(_metrics_scenarios, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    assert record["earlier_kept"], "an earlier metrics.jsonl.previous was replaced"
    assert record["first_rotated"] and record["fresh_rotated"]
    assert record["current"] == [2, 2]  # only the new run's train + valid record at iteration 2


def test_config_differences_ignore_allowed_keys_and_absent_ones():
    from megatron_csd.training.resume_config import config_differences, describe

    old = {"loss": {"objective": "csd", "temperature": 1.0}, "training": {"train_iters": 2, "seed": 1},
           "logging": {"output_dir": "a"}, "optimizer": {"lr": 1e-3}}
    new = {"loss": {"objective": "kl", "temperature": 2.0, "added_later": 1},
           "training": {"train_iters": 9, "seed": 1}, "logging": {"output_dir": "b"},
           "optimizer": {"lr": 1e-4}}
    differences = config_differences(old, new)
    assert differences == [("loss.objective", "csd", "kl"), ("loss.temperature", 1.0, 2.0)]
    listed = describe([(f"k{i}", i, i + 1) for i in range(7)])
    assert listed.count("->") == 5 and listed.endswith("(and 2 more)")
