"""The trainer gives the same losses on every TP / PP / DP layout, and never touches the teacher.

Same tiny teacher/student checkpoints, same data, global batch 4, micro batch 1, 3 iterations
of CSD distillation with AdamW, warmup, clipping: TP1/PP1 (one process, 4 accumulated
microbatches) is the reference for DP2 (2 accumulated microbatches per rank), TP2, PP2, TP2
with sequence parallelism, TP2/PP2 (4 processes) and TP2/PP2 with sequence parallelism.
Train losses and validation CE / distillation losses must agree to rtol 1e-5.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

RTOL = 1e-5


def _record(result) -> dict:
    return {"train": result.train_losses,
            "valid": [[v["ce"], v["kd"], v["loss"]] for v in result.validation]}


def _reference_and_teacher_checks(rank, world_size, workspace, out_file):
    """World of 1: write the initial checkpoints, train TP1/PP1, check the teacher is frozen."""
    import torch

    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import Trainer

    save_initial_models(workspace)
    config = tiny_config(workspace, os.path.join(workspace["root"], "run_ref"))
    trainer = Trainer(config)
    teacher = trainer.stage.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items() if isinstance(v, torch.Tensor)}
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimizer_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    ddp_ids = {id(p) for p in trainer.ddp.parameters()}
    student_before = [p.detach().clone() for p in trainer.student.parameters()]
    result = trainer.run()
    assert not teacher_ids & optimizer_ids, "teacher parameters reached the optimizer"
    assert not teacher_ids & ddp_ids, "teacher parameters are inside the DDP-wrapped module"
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training, "the teacher left eval mode"
    after = teacher.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"teacher tensor {key} changed during training"
    assert any(not torch.equal(a, b.detach()) for a, b in zip(student_before, trainer.student.parameters())), \
        "the student did not change"
    assert result.train_losses[0] > 0 and len(result.train_losses) == 3
    with open(out_file, "w") as handle:
        json.dump({"tp1pp1": _record(result)}, handle)
    destroy_parallel()


def _run_layouts(rank, world_size, workspace, layouts, out_file):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    records = {}
    for name, tp, pp, sequence_parallel in layouts:
        config = tiny_config(workspace, os.path.join(workspace["root"], f"run_{name}"), tp=tp, pp=pp,
                             parallel={"sequence_parallel": sequence_parallel},
                             checkpoint={"save_final": False})
        records[name] = _record(run_training(config))
        destroy_parallel()
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(records, handle)


@pytest.mark.slow
def test_losses_match_across_tp_pp_dp_layouts(tmp_path):
    workspace = build_workspace(str(tmp_path))
    files = [str(tmp_path / f"layouts_{n}.json") for n in range(3)]
    run_distributed(_reference_and_teacher_checks, 1, workspace, files[0])
    run_distributed(_run_layouts, 2, workspace,
                    [("dp2", 1, 1, False), ("tp2", 2, 1, False), ("pp2", 1, 2, False),
                     ("tp2_sp", 2, 1, True)], files[1])
    run_distributed(_run_layouts, 4, workspace,
                    [("tp2pp2", 2, 2, False), ("tp2pp2_sp", 2, 2, True)], files[2])
    records = {}
    for path in files:
        with open(path) as handle:
            records.update(json.load(handle))
    reference = records.pop("tp1pp1")
    assert len(records) == 6
    for name, record in records.items():
        assert record["train"] == pytest.approx(reference["train"], rel=RTOL), name
        for got, want in zip(record["valid"], reference["valid"]):
            assert got == pytest.approx(want, rel=RTOL), name
    # Training moved the student: the validation distillation loss changed.
    assert reference["valid"][0][1] != reference["valid"][-1][1]
