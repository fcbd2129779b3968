"""An existing run is never overwritten by accident (issue 8, item 2).

- re-running a finished run without --load: "already finished", nothing trained, logged or saved;
- re-running with more iterations and no --load: resumes from the save dir's latest (says so),
  the earlier checkpoints stay byte-for-byte;
- --load of another run's checkpoint into a save dir that holds a run: one-line refusal
  naming the choices, nothing written;
- --overwrite-save: trains from scratch, replaces only the iter_* of the iterations it saves,
  keeps the earlier run's other iter_* and a foreign file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from tests.reliability.helpers import listing, sft_config
from tests.spawn import run_distributed
from tests.test_training_common import build_workspace


def _train(config):
    """run_training with stdout captured: (result or the exception, printed text)."""
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            outcome = run_training(config)
        except ValueError as err:
            outcome = err
        finally:
            destroy_parallel()
    return outcome, text.getvalue()


def _metrics(output_dir: str) -> list:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return handle.read().splitlines()


def _resume_scenarios(rank, world_size, workspace, out_file):
    run = os.path.join(workspace["root"], "run")
    save = os.path.join(run, "checkpoints")
    first, _ = _train(sft_config(workspace, run, train_iters=2))
    before, metrics_before = listing(save), _metrics(run)

    finished, finished_text = _train(sft_config(workspace, run, train_iters=2))
    after_finished, metrics_finished = listing(save), _metrics(run)

    resumed, resumed_text = _train(sft_config(workspace, run, train_iters=3))
    after_resume = listing(save)
    with open(os.path.join(save, "latest")) as handle:
        latest = handle.read().strip()
    with open(out_file, "w") as handle:
        json.dump({
            "first": first.train_losses, "first_checkpoint": first.checkpoint,
            "finished_losses": finished.train_losses, "finished_checkpoint": finished.checkpoint,
            "finished_text": finished_text, "unchanged_after_finished": before == after_finished,
            "metrics_unchanged": metrics_before == metrics_finished,
            "resumed_losses": resumed.train_losses, "resumed_text": resumed_text,
            "old_files_kept": all(after_resume.get(k) == v for k, v in before.items()
                                  if k.startswith("iter_")),
            "latest": latest,
        }, handle)


@pytest.mark.slow
def test_rerun_without_load_resumes_and_a_finished_run_is_not_redone(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    out_file = str(tmp_path / "result.json")
    run_distributed(_resume_scenarios, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    assert len(record["first"]) == 2
    # Same train_iters again: nothing is trained, evaluated, logged or saved.
    assert record["finished_losses"] == []
    assert record["finished_checkpoint"] == record["first_checkpoint"]
    assert "already at iteration 2 >= train_iters 2" in record["finished_text"]
    assert record["unchanged_after_finished"] and record["metrics_unchanged"]
    # More iterations, no --load: resumed from iteration 2, one more step, old files intact.
    assert len(record["resumed_losses"]) == 1
    assert "resuming from" in record["resumed_text"] and "at iteration 2" in record["resumed_text"]
    assert "--overwrite-save" in record["resumed_text"]
    assert record["old_files_kept"] and record["latest"] == "iter_0000003"


def _refuse_and_overwrite(rank, world_size, workspace, out_file):
    run, other = os.path.join(workspace["root"], "run"), os.path.join(workspace["root"], "other")
    save = os.path.join(run, "checkpoints")
    _train(sft_config(workspace, run, train_iters=3))
    _train(sft_config(workspace, other, train_iters=2, save_interval=2))
    before = listing(save)

    refused, _ = _train(sft_config(workspace, run, train_iters=3,
                                   load=os.path.join(other, "checkpoints")))
    after_refusal = listing(save)

    with open(os.path.join(save, "notes.txt"), "w") as handle:
        handle.write("mine")
    fresh, fresh_text = _train(sft_config(workspace, run, train_iters=2, overwrite_save=True))
    after = listing(save)
    with open(os.path.join(save, "latest")) as handle:
        latest = handle.read().strip()
    with open(out_file, "w") as handle:
        json.dump({
            "refused": f"{type(refused).__name__}: {refused}",
            "untouched_by_refusal": before == after_refusal,
            "fresh_losses": fresh.train_losses, "fresh_text": fresh_text, "latest": latest,
            "notes_kept": os.path.isfile(os.path.join(save, "notes.txt")),
            "iter3_kept": {k: v for k, v in after.items() if k.startswith("iter_0000003/")}
            == {k: v for k, v in before.items() if k.startswith("iter_0000003/")},
            "iter2_replaced": after["iter_0000002/trainer_state.json"]
            != before["iter_0000002/trainer_state.json"],
        }, handle)


@pytest.mark.slow
def test_foreign_load_is_refused_and_overwrite_save_keeps_other_files(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    out_file = str(tmp_path / "result.json")
    run_distributed(_refuse_and_overwrite, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    refused = record["refused"]
    assert refused.startswith("RunRefusedError: --load ") and "\n" not in refused
    for choice in ("no --load", "new --output-dir", "--overwrite-save"):
        assert choice in refused
    assert record["untouched_by_refusal"]
    # --overwrite-save: trained from scratch; only iter_1 / iter_2 replaced, the rest kept.
    assert len(record["fresh_losses"]) == 2 and record["latest"] == "iter_0000002"
    assert "--overwrite-save" in record["fresh_text"] and "starting from scratch" in record["fresh_text"]
    assert record["notes_kept"] and record["iter3_kept"] and record["iter2_replaced"]
