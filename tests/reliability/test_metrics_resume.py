"""After a resume metrics.jsonl holds one record per iteration (the stale tail is dropped atomically).

The kill is emulated by its on-disk result: run A trains 3 iterations with a checkpoint at
iteration 2 and no final save, so metrics.jsonl already holds iterations 1-3 while ``latest``
names iteration 2 (what a kill -9 during iteration 4 leaves). Run B resumes and trains to 4.
"""
import json
import os

import pytest

from megatron_csd.training.metrics_file import drop_records_after
from tests.spawn import run_distributed
from tests.test_training_common import build_workspace

from .runs import config_tree


def _records(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _kill_and_resume(rank, world_size, workspace, run):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.config_io import config_from_dict
    from megatron_csd.training.trainer import run_training

    def config(train_iters, **checkpoint):
        return config_from_dict(config_tree(workspace, run, mode="sft", training={"train_iters": train_iters},
                                            checkpoint={"save_interval": 2, **checkpoint}))

    run_training(config(3, save_final=False))
    destroy_parallel()
    run_training(config(4, load=os.path.join(run, "checkpoints")))
    destroy_parallel()


@pytest.mark.slow
def test_resume_after_a_kill_leaves_one_record_per_iteration(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    run = str(tmp_path / "run")
    run_distributed(_kill_and_resume, 1, workspace, run)
    records = _records(os.path.join(run, "metrics.jsonl"))
    train = [r["iteration"] for r in records if r["split"] == "train"]
    valid = [r["iteration"] for r in records if r["split"] == "valid"]
    assert train == [1, 2, 3, 4], train
    assert valid == [4], valid  # run A's final validation at iteration 3 was stale too
    assert not os.path.exists(os.path.join(run, "metrics.jsonl.tmp"))


def _write_lines(path, lines):
    with open(path, "w") as handle:
        handle.write("".join(lines))


def test_drop_records_after_keeps_earlier_lines_verbatim_and_drops_a_torn_tail(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = ['{"split": "train", "iteration": 1, "loss": 1.0}\n', "a note someone added\n",
             '{"iteration": 2, "split": "valid", "loss": NaN}\n', '{"split": "train", "iteration": 3}\n',
             '{"split": "train", "iteration": 4, "lo']
    _write_lines(path, lines)
    assert drop_records_after(path, 2) == 2
    with open(path) as handle:
        assert handle.read() == "".join(lines[:3])
    assert drop_records_after(path, 2) == 0 and drop_records_after(str(tmp_path / "missing"), 1) == 0


def test_drop_records_after_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    lines = ['{"iteration": 1}\n', '{"iteration": 2}\n']
    _write_lines(path, lines)

    def crash(*args):
        raise KeyboardInterrupt("killed between the temporary write and the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        drop_records_after(path, 1)
    with open(path) as handle:
        assert handle.read() == "".join(lines)  # the old file, whole
