"""Smaller items: --train-iters 0 is a clear error; --load of an unfinished iter_N.tmp says so;
--divergence-warning-factor is validated."""
import json
import os

import pytest

from megatron_csd.training.checkpointing import resolve_checkpoint_dir
from megatron_csd.training.config import TrainingConfig


def test_train_iters_zero_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train_iters \(--train-iters / TRAIN_ITERS\) is 0: the run would train nothing"):
        TrainingConfig(train_iters=0)
    with pytest.raises(ValueError, match="must be >= 1, got -2"):
        TrainingConfig(train_iters=-2)


def test_train_iters_zero_on_the_command_line_exits_2_with_one_line(capsys):
    from megatron_csd.training.cli import main

    assert main(["--train-iters", "0", "--train-data", "x.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is 0: the run would train nothing" in err[0], err


@pytest.mark.parametrize("value, message", [(0.5, "must be > 1"), (-1.0, ">= 0")])
def test_divergence_warning_factor_is_validated(value, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(divergence_warning_factor=value)
    assert TrainingConfig(divergence_warning_factor=0).divergence_warning_factor == 0


def test_divergence_warning_factor_flag_parses():
    from megatron_csd.training.config_io import parse_config

    with pytest.raises(ValueError, match="no student"):  # the flag itself is accepted ...
        parse_config(["--divergence-warning-factor", "0"])
    with pytest.raises(ValueError, match="divergence_warning_factor must be > 1"):  # ... and checked
        parse_config(["--divergence-warning-factor", "0.5"])


def _save_dir(tmp_path, *, tmp_has_state: bool):
    save = tmp_path / "checkpoints"
    done = save / "iter_0000001"
    done.mkdir(parents=True)
    (done / "trainer_state.json").write_text(json.dumps({"iteration": 1}))
    (done / "model_config.json").write_text("{}")
    (save / "latest").write_text("iter_0000001\n")
    unfinished = save / "iter_0000002.tmp"
    unfinished.mkdir()
    (unfinished / "model_config.json").write_text("{}")  # the model is written first
    if tmp_has_state:  # rank 0 had written trainer_state.json when the run died
        (unfinished / "trainer_state.json").write_text(json.dumps({"iteration": 2}))
    return str(save), str(unfinished)


@pytest.mark.parametrize("tmp_has_state", [False, True])
def test_load_of_an_unfinished_save_says_so_and_names_the_previous_checkpoint(tmp_path, tmp_has_state):
    save, unfinished = _save_dir(tmp_path, tmp_has_state=tmp_has_state)
    for load in (unfinished, unfinished + os.sep):
        with pytest.raises(ValueError) as info:
            resolve_checkpoint_dir(load)
        message = str(info.value)
        assert "unfinished save" in message and "cannot be resumed" in message, message
        assert f"--load {save} (its 'latest')" in message, message
        assert os.path.join(save, "iter_0000001") in message, message
        assert "--student-checkpoint" not in message, message
    assert resolve_checkpoint_dir(save) == os.path.join(save, "iter_0000001")
