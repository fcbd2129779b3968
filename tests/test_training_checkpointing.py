"""Publishing a checkpoint never leaves ``latest`` naming a missing or incomplete directory.

``publish_checkpoint`` is the file-system step of ``save_checkpoint`` (rank 0, after every
rank has written ``iter_N.tmp``). Each scenario is replayed with a simulated crash (an
exception) at every file-system call it makes, in turn; after each crash ``latest`` must
resolve to a complete checkpoint holding either the old or the new state, and a fresh save
afterwards must succeed and be what ``latest`` names.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from megatron_csd.training import checkpointing
from megatron_csd.training.checkpointing import (STATE_FILE, publish_checkpoint,
                                                 resolve_checkpoint_dir)


class SimulatedCrash(Exception):
    pass


def _write_tmp(save_dir, iteration: int, tag: str) -> str:
    tmp = os.path.join(save_dir, f"iter_{iteration:07d}.tmp")
    os.makedirs(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "model", "weights"), "w") as handle:
        handle.write(tag)
    with open(os.path.join(tmp, STATE_FILE), "w") as handle:
        json.dump({"iteration": iteration, "tag": tag}, handle)
    return tmp


def _latest_state(save_dir) -> dict:
    directory = resolve_checkpoint_dir(str(save_dir))  # raises when latest dangles / is incomplete
    with open(os.path.join(directory, "model", "weights")) as handle:
        weights = handle.read()
    with open(os.path.join(directory, STATE_FILE)) as handle:
        state = json.load(handle)
    assert state["tag"] == weights, "a checkpoint mixes two saves"
    return state


def _crash_on_call(monkeypatch, number: int) -> list:
    """Make the ``number``-th file-system mutation (0-based) raise; returns the call log."""
    calls = []

    def wrap(name, original):
        def wrapper(*args, **kwargs):
            calls.append(name)
            if len(calls) - 1 == number:
                raise SimulatedCrash(f"crash at {name} #{number}")
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(checkpointing.os, "replace", wrap("os.replace", os.replace))
    monkeypatch.setattr(checkpointing.shutil, "rmtree", wrap("shutil.rmtree", shutil.rmtree))
    return calls


SCENARIOS = {
    # name: checkpoints published before the crashing save (iteration, tag), then the save
    "first save": ([], (2, "new")),
    "next iteration": ([(2, "old")], (4, "new")),
    "re-save the iteration latest names": ([(2, "old")], (2, "new")),
    "re-save it twice (back from .alt)": ([(2, "old"), (2, "older")], (2, "new")),
    # iter_4 exists but latest names iter_2 (as after a crash before latest moved, or a resume
    # from iter_2 of this save dir): the stale iter_4 is replaced.
    "re-save a stale copy latest does not name": ([(4, "stale"), (2, "old")], (4, "new")),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_a_crash_at_any_step_leaves_latest_on_a_complete_checkpoint(tmp_path, monkeypatch, scenario):
    before, (iteration, tag) = SCENARIOS[scenario]
    crash_at = 0
    while True:
        save_dir = tmp_path / f"{scenario.replace(' ', '_')}_{crash_at}"
        save_dir.mkdir()
        for old_iteration, old_tag in before:
            publish_checkpoint(str(save_dir), _write_tmp(str(save_dir), old_iteration, old_tag), old_iteration)
        previous = _latest_state(save_dir) if before else None
        calls = _crash_on_call(monkeypatch, crash_at)
        tmp = _write_tmp(str(save_dir), iteration, tag)
        try:
            published = publish_checkpoint(str(save_dir), tmp, iteration)
            crashed = False
        except SimulatedCrash:
            crashed = True
        monkeypatch.undo()
        if not crashed:  # every step has had its crash
            assert _latest_state(save_dir) == {"iteration": iteration, "tag": tag}
            assert resolve_checkpoint_dir(str(save_dir)) == published
            leftovers = sorted(p for p in os.listdir(save_dir) if p.startswith(f"iter_{iteration:07d}"))
            assert leftovers == [os.path.basename(published)], leftovers  # one copy per iteration
            break
        if previous is None:
            assert not (save_dir / "latest").exists() or _latest_state(save_dir)["tag"] == tag
        else:
            assert _latest_state(save_dir) in (previous, {"iteration": iteration, "tag": tag}), calls
        # The relaunched run saves again, into the same directory, and that works.
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # save_checkpoint clears the debris of a crash the same way
        again = _write_tmp(str(save_dir), iteration, "retry")
        publish_checkpoint(str(save_dir), again, iteration)
        assert _latest_state(save_dir)["tag"] == "retry"
        crash_at += 1
    assert crash_at >= 2  # the loop really crashed the save at several steps
