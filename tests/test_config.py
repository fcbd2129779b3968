"""The training config tree: YAML + flags, validation messages, resolved config on disk."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from megatron_csd.training.config import check_world_size
from megatron_csd.training.config_io import config_from_dict, parse_config, save_resolved_config

BASE = ["--student-preset", "tiny-gemma", "--teacher-preset", "tiny-gemma",
        "--train-data", "train", "--tokenizer", "tok.model"]


def test_flags_fill_the_tree_with_megatron_style_names():
    config = parse_config(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                  "--sequence-parallel", "--micro-batch-size", "2", "--global-batch-size", "8",
                                  "--seq-length", "64", "--objective", "rkl", "--kd-ratio", "0.25",
                                  "--student-override", "hidden_size=32", "--student-override", "num_layers=4",
                                  "--lr-decay-style", "linear", "--save-final", "false"])
    assert config.parallel.tensor_model_parallel_size == 2
    assert config.parallel.pipeline_model_parallel_size == 2
    assert config.parallel.sequence_parallel is True
    assert config.training.micro_batch_size == 2 and config.training.seq_length == 64
    assert config.loss.objective == "rkl" and config.loss.kd_ratio == 0.25
    assert config.student.overrides == {"hidden_size": 32, "num_layers": 4}
    assert config.optimizer.lr_decay_style == "linear"
    assert config.checkpoint.save_final is False


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"training": {"train_iters": 7, "seq_length": 48},
                                    "optimizer": {"lr": 0.5}}))
    config = parse_config(BASE + ["--config", str(path), "--lr", "0.25"])
    assert config.training.train_iters == 7 and config.training.seq_length == 48
    assert config.optimizer.lr == 0.25


def test_resolved_config_round_trips(tmp_path):
    config = parse_config(BASE + ["--seed", "5", "--student-override", "hidden_size=32"])
    path = save_resolved_config(config, str(tmp_path))
    with open(path) as handle:
        again = config_from_dict(yaml.safe_load(handle))
    assert again == config


@pytest.mark.parametrize("tree, message", [
    ({"trainng": {}}, "unknown key(s) ['trainng']"),
    ({"training": {"iters": 3}}, "allowed: ['divergence_warning_factor', 'eval_at_start'"),
    ({"optimizer": {"lr_decay_style": "exp"}}, "choose one of ['cosine', 'linear', 'constant']"),
    ({"loss": {"objective": "kl"}}, "objective='kl' is unknown"),
    ({"loss": {"kd_ratio": 1.5}}, "kd_ratio must be <= 1.0"),
    ({"parallel": {"sequence_parallel": True}}, "sequence_parallel needs tensor_model_parallel_size > 1"),
    ({"parallel": {"virtual_pipeline_model_parallel_size": 2}}, "interleaved pipeline schedule"),
    ({"training": {"global_batch_size": 6, "micro_batch_size": 4}}, "must be a multiple of"),
    ({"teacher": {}}, "mode 'distill' needs a teacher"),
    ({"mode": "sft"}, "mode 'sft' trains without a teacher"),
    ({"student": {"preset": "tiny-gemma", "checkpoint": "x"}}, "not both"),
    ({"device": "tpu"}, "device='tpu' is not allowed"),
    ({"fp8_teacher": "e5m2"}, "fp8_teacher='e5m2' is not allowed"),
    ({"data": {"tokenizer": None}}, "data.tokenizer (--tokenizer) is required"),
    ({"training": {"seq_length": "64"}}, "training.seq_length must be an int"),
])
def test_bad_configs_raise_with_a_clear_message(tree, message):
    base = {"student": {"preset": "tiny-gemma"}, "teacher": {"preset": "tiny-gemma"},
            "data": {"train_path": "t", "tokenizer": "tok"}}
    for key, value in tree.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and value:
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    with pytest.raises((ValueError, TypeError)) as err:
        config_from_dict(base)
    assert message in str(err.value)


def test_world_size_must_fit_the_layout():
    config = parse_config(BASE + ["--tensor-model-parallel-size", "2", "--global-batch-size", "6"])
    assert check_world_size(config, 6) == 3
    with pytest.raises(ValueError, match="not divisible by tensor_model_parallel_size"):
        check_world_size(config, 3)
    with pytest.raises(ValueError, match="global_batch_size 6 must be a multiple"):
        check_world_size(config, 8)


def test_mixed_precision_on_cpu_is_a_clear_error():
    from megatron_csd.training.trainer import _resolve_precision

    config = parse_config(BASE + ["--precision", "bf16"])
    with pytest.raises(ValueError, match="needs CUDA"):
        _resolve_precision(config, "cpu")
    assert _resolve_precision(parse_config(BASE), "cpu") == "fp32"
    assert _resolve_precision(parse_config(BASE), "cuda") == "bf16"


def test_cli_reports_config_errors_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "megatron_csd.training.cli", "--mode", "sft",
                           "--train-data", "x", "--tokenizer", "t"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "configuration error: no student" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_flag_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        parse_config(BASE + ["--tensor-parallel", "2"])
    assert exc.value.code == 2


def test_exponent_numbers_parse_as_floats_in_yaml_overrides_and_flags(tmp_path):
    """PyYAML alone reads ``1e-5`` (no dot) as a string; the config loader reads a float."""
    path = tmp_path / "run.yaml"
    path.write_text("optimizer:\n  lr: 1e-5\n  min_lr: 1E-6\n  adam_eps: 1e-8\n"
                    "loss:\n  temperature: 2e+0\n"
                    "student:\n  preset: tiny-gemma\n  overrides:\n    norm_epsilon: 3E-4\n")
    assert isinstance(yaml.safe_load(path.read_text())["optimizer"]["lr"], str)  # the trap
    config = parse_config(["--teacher-preset", "tiny-gemma", "--train-data", "train",
                           "--tokenizer", "tok.model", "--config", str(path),
                           "--student-override", "init_method_std=2e-2", "--weight-decay", "1e-1"])
    assert config.optimizer.lr == 1e-5 and config.optimizer.min_lr == 1e-6
    assert config.optimizer.adam_eps == 1e-8 and config.loss.temperature == 2.0
    assert config.optimizer.weight_decay == 0.1
    assert config.student.overrides == {"norm_epsilon": 3e-4, "init_method_std": 0.02}
    assert all(isinstance(v, float) for v in config.student.overrides.values())
    # Integers, words and the usual dotted floats are unchanged.
    again = parse_config(BASE + ["--student-override", "num_layers=4", "--student-override",
                                 "activation=gelu", "--student-override", "hidden_dropout=0.1"])
    assert again.student.overrides == {"num_layers": 4, "activation": "gelu", "hidden_dropout": 0.1}
    assert isinstance(again.student.overrides["num_layers"], int)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_model_source_flags_replace_the_yaml_source(tmp_path, role):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "student": {"preset": "tiny-gemma", "overrides": {"hidden_size": 32}},
        "teacher": {"checkpoint": "yaml_teacher"},
        "data": {"train_path": "train", "tokenizer": "tok.model"}}))
    # A checkpoint flag replaces the YAML preset (and that preset's overrides) ...
    config = parse_config(["--config", str(path), f"--{role}-checkpoint", "flag_ckpt"])
    assert getattr(config, role).checkpoint == "flag_ckpt"
    assert getattr(config, role).preset is None and getattr(config, role).overrides == {}
    # ... and a preset flag replaces the YAML checkpoint.
    config = parse_config(["--config", str(path), f"--{role}-preset", "tiny-gemma"])
    assert getattr(config, role).preset == "tiny-gemma"
    assert getattr(config, role).checkpoint is None
    # The other model keeps its YAML source; both flags at once are still an error.
    other = "teacher" if role == "student" else "student"
    assert getattr(config, other) == parse_config(["--config", str(path)]).__getattribute__(other)
    with pytest.raises(ValueError, match="not both"):
        parse_config(["--config", str(path), f"--{role}-preset", "tiny-gemma",
                      f"--{role}-checkpoint", "flag_ckpt"])
