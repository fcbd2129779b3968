"""The fused output layer + loss trains exactly like the unfused path on every TP / PP layout.

Same tiny Gemma teacher/student checkpoints and data as test_training_layouts.py (Gemma ties the
output layer to the word embedding; an untied student is checked too). Per layout and objective
the trainer runs 3 iterations with ``loss.fused_output_loss`` false and then true, from the same
weights; after every iteration each rank compares the loss and the ``main_grad`` of every student
parameter it holds (after finalize_model_grads: DP/embedding all-reduces, 1/num_tokens scaling,
clipping), then the validation metrics. At PP 2 the tied embedding's gradient is all-reduced
between the first and the last stage; the fused path writes the last stage's share into
``main_grad``, so a lost or doubled share would show in the first stage's embedding gradient.
The fused path runs with a chunk of 16 tokens (several chunks per microbatch).
Tolerance: rtol 1e-5, plus an atol of 1e-5 x the tensor's largest magnitude (summation order).
"""
from __future__ import annotations

import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import STUDENT_OVERRIDES, build_workspace, save_initial_models, tiny_config

RTOL = 1e-5
CSD_MIX = ("csd", "MM", 0.5)
FKL = ("fkl", "SS", 1.0)


def _train(workspace, name, tp, pp, sp, case, fused, student):
    import torch

    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import Trainer

    objective, weights, kd_ratio = case
    config = tiny_config(workspace, os.path.join(workspace["root"], f"fused_{name}_{objective}_{fused}_{student}"),
                         tp=tp, pp=pp, parallel={"sequence_parallel": sp}, checkpoint={"save_final": False},
                         loss={"objective": objective, "weights": weights, "kd_ratio": kd_ratio,
                               "fused_output_loss": fused},
                         student={"checkpoint": workspace[student]})
    trainer = Trainer(config)
    assert trainer.stage.fused == (fused and trainer.ctx.is_last_stage)
    steps = []
    for _ in range(3):
        record = trainer.train_step()
        grads = {name: p.main_grad.detach().clone() for name, p in trainer.student.named_parameters()}
        assert all(torch.isfinite(g).all() for g in grads.values())
        steps.append((record["loss"], record["ce"], record["kd"], grads))
    valid = trainer.evaluate()
    trainer.writer.close()
    destroy_parallel()
    return steps, valid


def _compare(rank, world_size, workspace, layouts):
    import torch

    from megatron_csd.training import fused_loss

    fused_loss.CHUNK_BYTES = 16 * 4 * 512  # 16 tokens per chunk at the toy vocabulary
    for name, tp, pp, sp, case, student in layouts:
        want = _train(workspace, name, tp, pp, sp, case, False, student)
        got = _train(workspace, name, tp, pp, sp, case, True, student)
        label = f"{name} {case} {student}"
        for step, (w, g) in enumerate(zip(want[0], got[0])):
            assert g[:3] == pytest.approx(w[:3], rel=RTOL), f"{label} step {step} loss/ce/kd"
            assert list(g[3]) == list(w[3])
            for param, reference in w[3].items():
                atol = RTOL * float(reference.abs().max())
                torch.testing.assert_close(g[3][param], reference, rtol=RTOL, atol=atol,
                                           msg=lambda m: f"{label} step {step} grad {param} rank {rank}: {m}")
        for key in ("loss", "ce", "kd", "teacher_ce"):
            assert got[1][key] == pytest.approx(want[1][key], rel=RTOL), f"{label} valid {key}"


def _setup_and_compare(rank, world_size, workspace, layouts):
    import shutil

    from megatron_csd.data import load_tokenizer
    from megatron_csd.models import build_gpt_model, get_preset
    from megatron_csd.models.checkpoint import save_model
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel

    save_initial_models(workspace)
    tokenizer = load_tokenizer(workspace["tokenizer"])
    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=9)
    cfg = get_preset("tiny-gemma").replace(vocab_size=tokenizer.vocab_size, tie_embeddings=False,
                                           **STUDENT_OVERRIDES)
    save_model(build_gpt_model(cfg), workspace["student_untied"], cfg)
    shutil.copy(workspace["tokenizer"], os.path.join(workspace["student_untied"], "tokenizer.model"))
    destroy_parallel()
    _compare(rank, world_size, workspace, layouts)


@pytest.mark.slow
def test_fused_training_matches_unfused_on_every_layout(tmp_path):
    workspace = build_workspace(str(tmp_path))
    workspace["student_untied"] = str(tmp_path / "student_untied")
    run_distributed(_setup_and_compare, 1, workspace,
                    [("tp1", 1, 1, False, CSD_MIX, "student"), ("tp1", 1, 1, False, FKL, "student_untied")])
    run_distributed(_compare, 2, workspace,
                    [("tp2", 2, 1, False, CSD_MIX, "student"), ("tp2_sp", 2, 1, True, FKL, "student"),
                     ("pp2", 1, 2, False, FKL, "student_untied")])
    run_distributed(_compare, 4, workspace,
                    [("tp2pp2", 2, 2, False, CSD_MIX, "student"), ("tp2pp2_sp", 2, 2, True, FKL, "student_untied")])
