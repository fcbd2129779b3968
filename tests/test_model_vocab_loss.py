"""The trainer's loss path works on the MODEL's vocabulary (issue 12), at TP 1 and TP 2 (gloo).

Tiny HF LLaMA teacher and student with 192 embedding rows and a tokenizer of 184 ids
(tests/vocab_models.py) are converted to Megatron (padded to 1024 columns). In each rank a
``Trainer`` is built from the converted checkpoints; on one of its training microbatches the
student's and teacher's vocab-parallel logits go through the trainer's own ``spec`` and
``objective.per_token_terms`` / ``loss_func``. References are dense fp64 over all 192 columns
of the gathered logits (tests/losses/dense_reference.py, ``F.cross_entropy``):
- per-token loss (csd SS, csd US, fkl; fkl also with kd_ratio 0.5, i.e. with CE) and the
  gradient of ``loss_sum`` w.r.t. the student logits on columns 0..191;
- exactly zero gradient on the Megatron padding columns 192..1023, and the same per-token loss
  when those columns' logits are overwritten with +30 (they are ignored, not merely zero);
- the ``ce`` and evaluation ``teacher_ce`` metrics equal CE over 192 columns.
On the old code (loss over the tokenizer's 184 columns) every comparison fails.
"""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from tests.spawn import run_distributed
from tests.vocab_models import ROWS, build_workspace, convert_models, train_config

pytest.importorskip("transformers")

OBJECTIVES = ((dict(objective="csd", weights="SS"), 1.0), (dict(objective="csd", weights="US"), 1.0),
              (dict(objective="fkl"), 1.0), (dict(objective="fkl"), 0.5))


def _gather(local: torch.Tensor, group, tp: int) -> torch.Tensor:
    if tp == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _reference(student, teacher, labels, mask, loss_config, kd_ratio):
    """(per-token loss, grad of the masked sum, CE) in fp64 over the first ROWS columns."""
    from tests.losses.dense_reference import dense_loss

    zs = student[..., :ROWS].double().requires_grad_(True)
    zt = teacher[..., :ROWS].double()
    kd = dense_loss(zs, zt, loss_config)
    ce = F.cross_entropy(zs.reshape(-1, ROWS), labels.reshape(-1), reduction="none").view(labels.shape)
    loss = kd_ratio * kd + (1.0 - kd_ratio) * ce
    (grad,) = torch.autograd.grad(torch.where(mask, loss, 0.0).sum(), zs)
    return loss.detach(), grad, ce.detach()


def _check_layout(trainer, tp: int):
    from megatron_csd.losses import LossConfig
    from megatron_csd.training.objective import loss_func, per_token_terms

    assert trainer.spec.vocab_size == ROWS and trainer.spec.padded_vocab_size == 1024
    group = trainer.ctx.tp_group
    batch = next(trainer.train_iterator)
    with torch.no_grad():
        student_local, teacher_local = trainer.ddp(batch["tokens"], batch["position_ids"], None)
    student, teacher = _gather(student_local, group, tp), _gather(teacher_local, group, tp)
    assert student.shape[-1] == teacher.shape[-1] == 1024
    mask = batch["loss_mask"] > 0
    labels = torch.where(mask, batch["labels"], 0)
    assert mask.any()
    start = trainer.ctx.tp_rank * student_local.shape[-1]
    local_cols = torch.arange(start, start + student_local.shape[-1])
    for loss_fields, kd_ratio in OBJECTIVES:
        spec = dataclasses.replace(trainer.spec, loss_config=LossConfig(**loss_fields), kd_ratio=kd_ratio)
        ref_loss, ref_grad, ref_ce = _reference(student, teacher, labels, mask, spec.loss_config, kd_ratio)
        leaf = student_local.detach().clone().requires_grad_(True)
        terms = per_token_terms(leaf, teacher_local, labels, spec)
        torch.testing.assert_close(terms.loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        loss_sum, _, metrics = loss_func(batch, teacher_local, spec, True, leaf)
        loss_sum.backward()
        grad = _gather(leaf.grad, group, tp)
        torch.testing.assert_close(grad[..., :ROWS].double(), ref_grad, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(grad[..., ROWS:]) == 0, "gradient on Megatron padding columns"
        torch.testing.assert_close(metrics["ce"][0].double(), ref_ce[mask].sum(), rtol=1e-5, atol=1e-5)
        teacher_ce = F.cross_entropy(teacher[..., :ROWS].double()[mask], labels[mask], reduction="sum")
        torch.testing.assert_close(metrics["teacher_ce"][0].double(), teacher_ce, rtol=1e-5, atol=1e-5)
        # Padding columns are ignored whatever they hold (the converted model's are exactly 0).
        hot = local_cols >= ROWS
        terms_hot = per_token_terms(student_local.masked_fill(hot, 30.0),
                                    teacher_local.masked_fill(hot, 30.0), labels, spec)
        torch.testing.assert_close(terms_hot.loss, terms.loss, rtol=0, atol=0)


def _body(rank, world_size, workspace):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import Trainer

    for tp in (2, 1):  # world 2: TP 2 x DP 1, then TP 1 x DP 2 (each rank checks its own batch)
        # The unfused path, whose loss_func sees the logits (the fused path's parity with it,
        # padded vocabulary included, is tests/test_fused_output_loss*.py).
        trainer = Trainer(train_config(workspace, os.path.join(workspace["root"], f"run_tp{tp}"), tp=tp,
                                       loss={"objective": "fkl", "fused_output_loss": False}))
        try:
            _check_layout(trainer, tp)
        finally:
            trainer.writer.close()
            destroy_parallel()


@pytest.mark.slow
def test_trainer_loss_uses_all_model_rows_tp1_tp2(tmp_path):
    workspace = convert_models(build_workspace(tmp_path))
    run_distributed(_body, 2, workspace)
