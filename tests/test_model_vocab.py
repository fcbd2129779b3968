"""The model's vocabulary (embedding rows), not the tokenizer's ids, is the run's vocabulary.

- conversion HF -> Megatron -> HF keeps vocab_size = 192 for a model whose tokenizer has 184
  ids (model_config.json records the HF rows, padded to 1024; the export has 192 rows again);
- plan_models: the loss vocabulary is the checkpoints' vocab_size (192, not the tokenizer's
  184; Qwen2.5's 151936 rows for 151665 ids); a preset student takes the checkpoint teacher's;
  teacher / student vocab mismatch and a tokenizer with more ids than model rows are one-line
  ValueErrors naming both sizes; a big surplus of rows only warns.
"""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from tests.vocab_models import IDS, ROWS, STUDENT_SHAPE, build_hf_model, build_tokenizer, rendered_texts



def test_conversion_round_trip_keeps_model_vocab_size(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf
    from megatron_csd.data import load_tokenizer
    from megatron_csd.models.checkpoint import load_model_config

    from megatron_csd.data.toy import generate_records

    build_tokenizer(rendered_texts(generate_records(64, seed=0)), tmp_path / "tokenizer")
    assert load_tokenizer(tmp_path / "tokenizer").vocab_size == IDS
    model = build_hf_model(tmp_path / "hf", STUDENT_SHAPE, extra_logit_scale=1.0,
                           tokenizer_dir=tmp_path / "tokenizer", seed=0)
    cfg = convert_hf_to_megatron(tmp_path / "hf", tmp_path / "mg")
    saved = load_model_config(tmp_path / "mg")
    assert (cfg.vocab_size, saved.vocab_size, saved.padded_vocab_size) == (ROWS, ROWS, 1024)
    config = convert_megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    assert config["vocab_size"] == ROWS
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == ROWS
    weights = load_file(str(tmp_path / "back" / "model.safetensors"))
    for name, original in (("model.embed_tokens.weight", model.model.embed_tokens.weight),
                           ("lm_head.weight", model.lm_head.weight)):
        assert weights[name].shape[0] == ROWS
        assert torch.equal(weights[name], original.detach()), name
    assert load_tokenizer(tmp_path / "back").vocab_size == IDS


def _checkpoint(directory, vocab_size: int) -> str:
    from megatron_csd.models import get_preset
    from megatron_csd.models.checkpoint import write_model_config

    os.makedirs(directory, exist_ok=True)
    write_model_config(directory, get_preset("tiny-llama").replace(vocab_size=vocab_size))
    return str(directory)


def _plan(tokenizer_ids: int, teacher, student, mode: str = "distill"):
    from megatron_csd.training.config_io import config_from_dict
    from megatron_csd.training.model_setup import plan_models

    def ref(value):
        return {"checkpoint": value} if isinstance(value, str) else {"preset": "tiny-llama", "overrides": value}

    tree = {"mode": mode, "student": ref(student), "data": {"train_path": "unused", "tokenizer": "unused"}}
    if mode == "distill":
        tree["teacher"] = ref(teacher)
    tokenizer = SimpleNamespace(vocab_size=tokenizer_ids, fingerprint="no tokenizer files checked")
    return plan_models(config_from_dict(tree), tokenizer)


def test_loss_vocabulary_is_the_models_rows_not_the_tokenizers_ids(tmp_path):
    rows192 = _checkpoint(tmp_path / "rows192", ROWS)
    plan = _plan(IDS, rows192, rows192)
    assert plan.vocab_size == plan.student.vocab_size == plan.teacher.vocab_size == ROWS
    qwen = _checkpoint(tmp_path / "qwen", 151936)  # Qwen2.5: 151936 rows, 151665 ids
    assert _plan(151665, qwen, qwen).vocab_size == 151936
    # A preset student takes the checkpoint teacher's vocabulary; alone, the tokenizer's.
    plan = _plan(IDS, rows192, {"hidden_size": 32})
    assert plan.student.vocab_size == plan.vocab_size == ROWS
    assert _plan(IDS, None, {}, mode="sft").vocab_size == IDS
    assert _plan(IDS, None, rows192, mode="sft").vocab_size == ROWS


def test_model_vocab_errors_are_one_line_and_name_both_sizes(tmp_path):
    rows192, rows200 = _checkpoint(tmp_path / "rows192", ROWS), _checkpoint(tmp_path / "rows200", 200)
    for teacher, student in ((rows192, rows200), (rows192, {"vocab_size": 200})):
        with pytest.raises(ValueError, match="teacher has 192 rows .*the student 200") as err:
            _plan(IDS, teacher, student)
        assert "\n" not in str(err.value) and "vocab_size" in str(err.value)
    with pytest.raises(ValueError, match="tokenizer has 200 ids but the teacher model has only 192") as err:
        _plan(200, rows192, rows200)
    assert "\n" not in str(err.value) and "own tokenizer" in str(err.value)
    # Many more rows than ids is not an error (real models pad to arbitrary multiples): a warning.
    wide = _checkpoint(tmp_path / "wide", 5000)
    with pytest.warns(UserWarning, match="cover less than half"):
        assert _plan(IDS, wide, wide).vocab_size == 5000
