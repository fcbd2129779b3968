"""A checkpoint save that hits a full disk removes its iter_N.tmp and fails on every rank.

Only rank 0's write of trainer_state.json into iter_0000002.tmp fails (ENOSPC, monkeypatched);
rank 1 has written its part and must not hang at the barrier: both ranks raise
CheckpointSaveError naming the path and saying the disk is full. iter_0000001 and ``latest``
stay as they were. Before the fix rank 0 raised a bare OSError, left the .tmp behind, and rank 1
hung or died on a broken connection.
"""
import errno
import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace

from .runs import config_tree, tree_digest


def _fails_for(path: str, stage: str) -> bool:
    """``write``: iteration 2's files in its .tmp; ``publish``: moving ``latest`` to iteration 2."""
    if stage == "write":
        return "iter_0000002.tmp" in path
    save_dir = os.path.dirname(path)
    return os.path.basename(path) == "latest" and os.path.isdir(os.path.join(save_dir, "iter_0000002"))


def _save_hits_full_disk(rank, world_size, workspace, run, out_dir, stage="write"):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training import checkpointing
    from megatron_csd.training.config_io import config_from_dict
    from megatron_csd.training.trainer import run_training

    original = checkpointing._write_text_atomic

    def full_disk(path, text):
        if _fails_for(path, stage):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return original(path, text)

    if rank == 0:
        checkpointing._write_text_atomic = full_disk
    config = config_from_dict(config_tree(workspace, run, mode="sft", tp=2,
                                          checkpoint={"save_interval": 1}))
    outcome = {"type": None, "message": None}
    try:
        run_training(config)
    except Exception as err:  # recorded for the parent test
        outcome = {"type": type(err).__name__, "message": str(err),
                   "is_oserror": isinstance(err, OSError), "errno": getattr(err, "errno", None)}
    finally:
        destroy_parallel()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(outcome, handle)


@pytest.mark.slow
def test_full_disk_during_save_cleans_up_and_every_rank_says_so(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    run = str(tmp_path / "run")
    run_distributed(_save_hits_full_disk, 2, workspace, run, str(tmp_path), timeout=240)
    save = os.path.join(run, "checkpoints")
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as handle:
            outcome = json.load(handle)
        assert outcome["type"] == "CheckpointSaveError", outcome
        assert outcome["is_oserror"] and outcome["errno"] == errno.ENOSPC, outcome
        message = outcome["message"]
        assert "disk is full" in message, message
        assert os.path.join(save, "iter_0000002.tmp", "trainer_state.json") in message, message
        assert "iter_0000002.tmp was removed" in message, message
    assert sorted(set(os.listdir(save)) - {"megatron_csd.lock"}) == ["iter_0000001", "latest"]
    with open(os.path.join(save, "latest")) as handle:
        assert handle.read().strip() == "iter_0000001"
    assert "trainer_state.json" in tree_digest(os.path.join(save, "iter_0000001"))


@pytest.mark.slow
def test_full_disk_while_publishing_fails_on_every_rank_and_keeps_latest(tmp_path):
    """Rank 0 alone fails to move ``latest`` (after the last barrier): no rank may hang."""
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    run = str(tmp_path / "run")
    run_distributed(_save_hits_full_disk, 2, workspace, run, str(tmp_path), "publish", timeout=240)
    save = os.path.join(run, "checkpoints")
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as handle:
            outcome = json.load(handle)
        assert outcome["type"] == "CheckpointSaveError", outcome
        assert "disk is full" in outcome["message"] and "latest" in outcome["message"], outcome
    with open(os.path.join(save, "latest")) as handle:
        assert handle.read().strip() == "iter_0000001"
