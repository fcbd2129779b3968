"""``training.packing: auto`` (the default): on exactly where packing is supported and verified.

Unit level (no model is built; transformer-engine is not installed here, so the TE spec is
decided from the config alone): auto resolves on for the local layer spec, off with one line for
the on-policy options (no error) and for the TE spec; explicit ``--packing`` with on-policy
options is still refused in one line. End to end (slow, a world of one): the pure model rule
agrees with the built models, a fresh auto run packs and records ``packing: true`` in its
config.yaml, and a run saved unpacked (its config.yaml saying ``packing: false``, or an old one
without the key) relaunched with default settings resumes unpacked with the losses of an
uninterrupted run (also when its checkpoint is loaded into a new folder with ``--load``), while
an explicit conflicting ``--packing`` is refused naming the key.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

TE_OFF = "packing: off (transformer-engine spec: THD path unverified on GPU; --packing to force)"


def _config(**sections):
    from megatron_csd.training.config_io import config_from_dict

    tree = {"mode": "distill", "device": "cpu", "student": {"preset": "tiny-gemma"},
            "teacher": {"preset": "tiny-llama"}, "data": {"train_path": "t", "tokenizer": "tok"}}
    tree.update(sections)
    return config_from_dict(tree)


def test_packing_flags_parse_to_auto_true_false():
    from megatron_csd.training.config_io import parse_config

    base = ["--student-preset", "tiny-gemma", "--teacher-preset", "tiny-gemma", "--train-data", "t",
            "--tokenizer", "tok"]
    assert parse_config(base).training.packing == "auto"
    assert parse_config(base + ["--packing"]).training.packing is True
    assert parse_config(base + ["--packing", "false"]).training.packing is False
    assert parse_config(base + ["--no-packing"]).training.packing is False
    assert parse_config(base + ["--packing", "auto"]).training.packing == "auto"
    with pytest.raises(ValueError, match="training.packing must be auto, true or false"):
        _config(training={"packing": "sometimes"})


def test_packing_auto_resolves_on_for_the_local_spec_on_cpu():
    from megatron_csd.models.builder import uses_te_spec
    from megatron_csd.training.packing_setup import resolve_packing, resolve_packing_at_start

    assert not uses_te_spec()  # CPU: the local layer spec
    for student in ("tiny-gemma", "tiny-llama", "tiny-gpt2"):  # rope and learned positions
        config = _config(student={"preset": student}, mode="sft", teacher={})
        assert resolve_packing(config, use_te=False) == (True, None)
    choice = resolve_packing_at_start(_config(), resumes_latest=False)
    assert choice == (True, None) and choice.apply(_config()).training.packing is True


def test_packing_auto_resolves_off_for_on_policy_options_without_error():
    from megatron_csd.training.packing_setup import resolve_packing

    for on_policy in ({"student_data_ratio": 0.5}, {"teacher_generated": True}):
        enabled, note = resolve_packing(_config(on_policy=on_policy), use_te=False)
        assert not enabled and note.startswith("packing: off (on-policy options") and "\n" not in note


def test_packing_auto_resolves_off_for_the_te_spec_from_the_config_alone():
    from megatron_csd.training.packing_setup import resolve_packing

    assert resolve_packing(_config(), use_te=True) == (False, TE_OFF)
    forced = _config(training={"packing": True})  # explicit --packing is still allowed (THD path)
    assert resolve_packing(forced, use_te=True) == (True, None)
    assert resolve_packing(_config(training={"packing": False}), use_te=False) == (False, None)


def test_packing_auto_resolves_off_for_a_model_packing_refuses(monkeypatch):
    from types import SimpleNamespace

    from megatron_csd.training import packing_setup

    windowed = SimpleNamespace(window_size=(4, 0), position_embedding_type="rope")
    monkeypatch.setattr(packing_setup, "_model_configs", lambda config: [windowed])
    enabled, note = packing_setup.resolve_packing(_config(), use_te=False)
    assert not enabled and note.startswith("packing: off (not supported with sliding-window")


def test_packing_explicit_with_on_policy_is_refused_in_one_line(capsys):
    from megatron_csd.training.cli import main

    status = main(["--student-preset", "tiny-gemma", "--teacher-preset", "tiny-gemma",
                   "--train-data", "t", "--tokenizer", "tok", "--packing", "--student-data-ratio", "0.5"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert err.startswith("megatron_csd: configuration error: --packing does not combine with the "
                          "on-policy options")


def test_packing_resume_keeps_the_saved_setting():
    from megatron_csd.training.packing_setup import resolve_packing

    for saved, want in (({"training": {"packing": False}}, False), ({"training": {}}, False),
                        ({"training": {"packing": True}}, True)):
        enabled, note = resolve_packing(_config(), use_te=False, resumed=saved)
        assert enabled is want and (note is None) == want
    # An explicit value is kept (a conflict is refused by the resume-config check).
    assert resolve_packing(_config(training={"packing": True}), use_te=False,
                           resumed={"training": {}}) == (True, None)


def _model_rule_agrees(workspace):
    """packing_refusal on the ModelConfig says what packing_mode says of the built model."""
    from megatron_csd.models import build_gpt_model, get_preset
    from megatron_csd.models.packed_attention import packing_mode, packing_refusal
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel

    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=3)
    for name in ("tiny-gemma", "tiny-llama", "tiny-gpt2"):
        cfg = get_preset(name)
        assert packing_refusal(None, cfg.position_embedding_type) is None
        assert packing_mode(build_gpt_model(cfg)) == "mask", name
    destroy_parallel()


def _resume_body(rank, world_size, workspace, out_file):
    import contextlib
    import io

    import yaml

    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    save_initial_models(workspace)
    _model_rule_agrees(workspace)
    root = workspace["root"]

    def train(name, train_iters, packing, **checkpoint):
        config = tiny_config(workspace, os.path.join(root, name), train_iters=train_iters,
                             training={"packing": packing, "eval_at_start": False},
                             optimizer={"lr_decay_iters": 4},  # the same lr at step k in every run
                             logging={"quiet": False}, checkpoint={"save_interval": 1, **checkpoint})
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                outcome = run_training(config).train_losses
        except ValueError as err:
            outcome = f"{type(err).__name__}: {err}"
        finally:
            destroy_parallel()
        return outcome, printed.getvalue()

    def saved_packing(name):
        with open(os.path.join(root, name, "config.yaml")) as handle:
            return yaml.safe_load(handle)["training"].get("packing", "absent")

    record = {}
    fresh, printed = train("fresh_auto", 2, "auto")
    record["fresh"] = {"packing": saved_packing("fresh_auto"), "report": "% packed" in printed,
                       "trained": isinstance(fresh, list) and len(fresh) == 2}
    record["straight"], _ = train("straight", 4, False)
    record["first"], _ = train("relaunched", 2, False)
    record["resumed_3"], record["printed_3"] = train("relaunched", 3, "auto")  # config.yaml: false
    record["refused_kept"], _ = train("relaunched", 4, True)
    path = os.path.join(root, "relaunched", "config.yaml")
    with open(path) as handle:  # an old run: config.yaml written before the key existed
        tree = yaml.safe_load(handle)
    del tree["training"]["packing"]
    with open(path, "w") as handle:
        yaml.safe_dump(tree, handle, sort_keys=False)
    record["refused_absent"], _ = train("relaunched", 4, True)
    record["resumed_4"], record["printed_4"] = train("relaunched", 4, "auto")
    record["absent_kept"] = saved_packing("relaunched")
    load = os.path.join(root, "relaunched", "checkpoints", "iter_0000002")  # into a new folder
    record["loaded"], _ = train("loaded_elsewhere", 4, "auto", load=load)
    record["loaded_packing"] = saved_packing("loaded_elsewhere")
    with open(out_file, "w") as handle:
        json.dump(record, handle)


@pytest.mark.slow
def test_packing_auto_relaunch_of_an_unpacked_run_resumes_unpacked(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=32, num_valid=4)
    out_file = str(tmp_path / "record.json")
    run_distributed(_resume_body, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)
    assert record["fresh"] == {"packing": True, "report": True, "trained": True}  # auto on CPU: on, recorded
    straight = record["straight"]
    assert len(straight) == 4 and record["first"] == straight[:2]
    assert record["resumed_3"] == straight[2:3] and record["resumed_4"] == straight[3:4]
    for key in ("printed_3", "printed_4"):
        assert "packing: off (as in the run being resumed" in record[key]
        assert "% packed" not in record[key]
    for key in ("refused_kept", "refused_absent"):
        refused = record[key]
        assert isinstance(refused, str) and "\n" not in refused, refused
        assert refused.startswith("RunRefusedError: ") and "training.packing: False -> True" in refused
    assert record["absent_kept"] == "absent"  # config.yaml is never overwritten
    # --load of its checkpoint into a new folder: auto follows the loaded run's config.yaml
    assert record["loaded"] == straight[2:] and record["loaded_packing"] is False
