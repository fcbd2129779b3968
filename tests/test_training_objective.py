"""loss_func against dense references; all-masked microbatches; start-up vocabulary checks.

The loss function runs inside a 1-process gloo world (Megatron's vocab-parallel CE needs its
TP group); references are written here with plain fp64 torch: CE over the real vocabulary
only, the distillation term from megatron_csd.losses (tested against its own dense references
in tests/losses), combined as kd_ratio * kd + (1 - kd_ratio) * CE over response tokens.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.spawn import run_distributed

VOCAB, PADDED = 10, 16


def _spec(distill: bool, kd_ratio: float = 1.0):
    from megatron.core import parallel_state

    from megatron_csd.losses import LossConfig
    from megatron_csd.training.objective import ObjectiveSpec

    return ObjectiveSpec(distill=distill, loss_config=LossConfig(objective="csd", weights="SS"),
                         kd_ratio=kd_ratio, vocab_size=VOCAB, padded_vocab_size=PADDED,
                         tp_group=parallel_state.get_tensor_model_parallel_group(), tp_rank=0, tp_size=1)


def _batch(mask_rows):
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, VOCAB, (3, 5), generator=generator)
    mask = torch.tensor(mask_rows, dtype=torch.float32)
    return {"labels": labels, "loss_mask": mask}


def _logits(seed: int, requires_grad: bool):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, PADDED, generator=generator, dtype=torch.float64).float() * 3
    logits[..., VOCAB:] = 50.0  # padding columns with huge logits must not count
    return logits.requires_grad_(requires_grad)


def _dense_ce(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[..., :VOCAB].double().reshape(-1, VOCAB), labels.reshape(-1), reduction="none").reshape(labels.shape)


def _loss_func_checks(rank, world_size):
    from megatron_csd.losses import distillation_loss
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel
    from megatron_csd.training.objective import loss_func

    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=1)
    rows = [[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    batch = _batch(rows)
    mask = batch["loss_mask"].bool()

    # SFT: CE over response tokens of the real vocabulary; input logits untouched.
    student = _logits(0, True)
    untouched = student.detach().clone()
    loss_sum, num_tokens, metrics = loss_func(batch, None, _spec(False), False, student)
    want = _dense_ce(student, batch["labels"])[mask].sum()
    assert int(num_tokens) == int(mask.sum())
    torch.testing.assert_close(loss_sum.double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(student.detach(), untouched), "loss_func modified the logits"
    loss_sum.backward()
    ref = student.detach().clone().requires_grad_(True)
    _dense_ce(ref, batch["labels"])[mask].sum().backward()
    torch.testing.assert_close(student.grad, ref.grad.float(), rtol=1e-5, atol=1e-6)
    assert torch.all(student.grad[..., VOCAB:] == 0)
    assert torch.all(student.grad[1] == 0), "a masked row received gradient"

    # Distillation with a CE mix, plus the evaluation-only teacher CE.
    for kd_ratio in (1.0, 0.3):
        student = _logits(0, True)
        teacher = _logits(1, False)
        loss_sum, num_tokens, metrics = loss_func(batch, teacher, _spec(True, kd_ratio), True, student)
        ref = student.detach().clone().requires_grad_(True)
        kd = distillation_loss(ref, teacher, _spec(True).loss_config, vocab_size=VOCAB).double()
        ce = _dense_ce(ref, batch["labels"])
        want = (kd_ratio * kd + (1 - kd_ratio) * ce)[mask].sum()
        torch.testing.assert_close(loss_sum.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["kd"][0].double(), kd[mask].sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["ce"][0].double(), ce[mask].sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(metrics["teacher_ce"][0].double(),
                                   _dense_ce(teacher, batch["labels"])[mask].sum(), rtol=1e-5, atol=1e-6)
        assert metrics["loss"][1] == mask.sum()
        loss_sum.backward()
        want.backward()
        torch.testing.assert_close(student.grad, ref.grad.float(), rtol=1e-4, atol=1e-6)

    # A microbatch without response tokens: exactly 0 loss, 0 tokens, 0 gradient, no NaN.
    # Non-finite logits at masked positions do not leak into the loss value either.
    empty = _batch([[0] * 5] * 3)
    for distill in (False, True):
        teacher = _logits(1, False) if distill else None
        student = _logits(0, True)
        loss_sum, num_tokens, metrics = loss_func(empty, teacher, _spec(distill, 0.5), False, student)
        assert loss_sum.item() == 0.0 and int(num_tokens) == 0
        loss_sum.backward()
        assert torch.all(student.grad == 0), "an all-masked microbatch produced gradient"
        assert all(torch.isfinite(v).all() for v in metrics.values())
        broken = _logits(0, False)
        broken[0, 0, :] = float("nan")
        broken[2, 1, 3] = float("inf")
        loss_sum, _, metrics = loss_func(empty, teacher, _spec(distill, 0.5), False, broken)
        assert loss_sum.item() == 0.0 and all(torch.isfinite(v).all() for v in metrics.values())
    destroy_parallel()


@pytest.mark.slow
def test_loss_func_matches_dense_reference_and_masks_exactly():
    run_distributed(_loss_func_checks, 1)


# ------------------------------------------------------------------ start-up checks (no dist)
@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    from megatron_csd.data.toy import build_toy_data

    root = tmp_path_factory.mktemp("tokenizers")
    first = build_toy_data(root / "a", num_train=200, num_valid=10, vocab_size=512)
    second = build_toy_data(root / "b", num_train=200, num_valid=10, seed=1, vocab_size=400)
    return str(first["tokenizer"]), str(second["tokenizer"])


def _fake_checkpoint(directory, cfg, tokenizer_file=None):
    import shutil

    from megatron_csd.models.checkpoint import write_model_config

    os.makedirs(directory, exist_ok=True)
    write_model_config(directory, cfg)
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, os.path.join(directory, "tokenizer.model"))
    return str(directory)


def _config(tokenizer, teacher, student=None, **student_overrides):
    from megatron_csd.training.config_io import config_from_dict

    student_ref = {"checkpoint": student} if student else {"preset": "tiny-gemma", "overrides": student_overrides}
    return config_from_dict({"student": student_ref, "teacher": {"checkpoint": teacher},
                             "data": {"train_path": "unused", "tokenizer": tokenizer}})


def test_teacher_with_another_tokenizer_is_rejected(tmp_path, two_tokenizers):
    from megatron_csd.data import load_tokenizer
    from megatron_csd.models import get_preset
    from megatron_csd.training.model_setup import plan_models

    ours, theirs = two_tokenizers
    tokenizer = load_tokenizer(ours)
    cfg = get_preset("tiny-gemma").replace(vocab_size=tokenizer.vocab_size)
    good = _fake_checkpoint(tmp_path / "good", cfg, ours)
    plan = plan_models(_config(ours, good, hidden_size=32), tokenizer)
    assert plan.vocab_size == tokenizer.vocab_size
    assert plan.student.padded_vocab_size == plan.teacher.padded_vocab_size
    bad = _fake_checkpoint(tmp_path / "bad", cfg, theirs)
    with pytest.raises(ValueError, match="ships a different tokenizer"):
        plan_models(_config(ours, bad), tokenizer)


def test_vocabulary_mismatches_are_start_up_errors(tmp_path, two_tokenizers):
    from megatron_csd.data import load_tokenizer
    from megatron_csd.models import get_preset
    from megatron_csd.training.model_setup import plan_models

    ours, _ = two_tokenizers
    tokenizer = load_tokenizer(ours)
    small = _fake_checkpoint(tmp_path / "small", get_preset("tiny-gemma").replace(vocab_size=tokenizer.vocab_size - 1))
    with pytest.raises(ValueError, match="tokenizer has .* ids but the .* model has only"):
        plan_models(_config(ours, small), tokenizer)
    # Many more model rows than tokenizer ids only warns (tests/test_model_vocab.py).
    huge = _fake_checkpoint(tmp_path / "huge", get_preset("tiny-gemma").replace(vocab_size=tokenizer.vocab_size + 5000))
    with pytest.warns(UserWarning, match="cover less than half"):
        assert plan_models(_config(ours, huge), tokenizer).vocab_size == tokenizer.vocab_size + 5000
    # Different padded widths are brought to the larger one (load_model re-pads on load).
    wide = _fake_checkpoint(tmp_path / "wide", get_preset("tiny-gemma").replace(
        vocab_size=tokenizer.vocab_size, padded_vocab_size=2048))
    plan = plan_models(_config(ours, wide), tokenizer)
    assert plan.student.padded_vocab_size == plan.teacher.padded_vocab_size == 2048
    with pytest.raises(ValueError, match="not ModelConfig fields"):
        plan_models(_config(ours, wide, hidden_sise=32), tokenizer)


def test_resume_pointer_never_names_an_incomplete_checkpoint(tmp_path):
    from megatron_csd.training.checkpointing import resolve_checkpoint_dir

    save = tmp_path / "checkpoints"
    (save / "iter_0000002").mkdir(parents=True)
    (save / "iter_0000002" / "trainer_state.json").write_text(json.dumps({"iteration": 2}))
    (save / "iter_0000004.tmp" / "model").mkdir(parents=True)  # a save that crashed midway
    (save / "latest").write_text("iter_0000002\n")
    assert resolve_checkpoint_dir(str(save)) == str(save / "iter_0000002")
    (save / "latest").write_text("iter_0000004.tmp\n")
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint_dir(str(save))
    with pytest.raises(ValueError, match="no 'latest' file"):
        resolve_checkpoint_dir(str(tmp_path))
