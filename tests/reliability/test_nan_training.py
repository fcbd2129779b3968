"""A run whose loss goes NaN (a huge learning rate, TP = 2) stops before saving, exit status 1.

Launch 1 trains one normal step and saves iter_0000001. Launch 2 resumes it with --lr 1e30:
step 2 is computed from good weights (finite), its update wrecks them, and step 3 is non-finite
(its grad norm is NaN; the loss may follow). Before this fix CSD turned the NaN logits into a loss of exactly 0 and the run went
on (exit 0, NaN checkpoints). Now every rank stops at iteration 3 with one line naming the
iteration and the metric, nothing is written for it, and iter_0000001 is byte-for-byte intact.
"""
import json
import os
import re

import pytest

from tests.test_training_common import build_workspace

from .runs import config_tree, torchrun, tree_digest, write_config


@pytest.mark.slow
def test_nan_from_a_huge_lr_at_tp2_stops_before_saving(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    run = str(tmp_path / "run")
    config = write_config(config_tree(workspace, run, tp=2, training={"train_iters": 1}),
                          str(tmp_path / "run.yaml"))
    first = torchrun(["--config", config], nproc=2)
    assert first.returncode == 0, first.stdout[-3000:]
    save = os.path.join(run, "checkpoints")
    good = os.path.join(save, "iter_0000001")
    before = tree_digest(good)

    second = torchrun(["--config", config, "--load", save, "--lr", "1e30", "--train-iters", "4",
                       "--save-interval", "3"], nproc=2)
    output = second.stdout
    ours = [line for line in output.splitlines() if "megatron_csd" in line]
    assert second.returncode != 0, output[-3000:]
    assert any("resumed from" in line and "iter_0000001" in line for line in ours), ours  # it loads
    stops = [line for line in output.splitlines() if line.startswith("megatron_csd: run stopped:")]
    assert len(stops) == 2, output[-3000:]  # one clear line per rank, no traceback needed
    for line in stops:
        assert re.search(r"non-finite (loss|ce|kd|grad_norm)\b.* at iteration 3 ", line), line
    # No worker traceback (torchrun's own report of the failed child is expected).
    assert not re.search(r'File ".*megatron_csd', output), output[-3000:]
    assert sorted(set(os.listdir(save)) - {"megatron_csd.lock"}) == ["iter_0000001", "latest"]
    with open(os.path.join(save, "latest")) as handle:
        assert handle.read().strip() == "iter_0000001"
    assert tree_digest(good) == before
    with open(os.path.join(run, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    # The resumed launch ran at its own --lr (Megatron's param groups used to keep the saved one).
    assert [r["lr"] for r in records if r.get("split") == "train" and r["iteration"] == 2] == [1e30]
