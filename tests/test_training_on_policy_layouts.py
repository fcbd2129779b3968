"""On-policy distillation in the trainer, with real generation (megatron_csd.generation).

Same tiny teacher/student checkpoints and data as test_training_layouts.py (global batch 4,
micro batch 1, 3 iterations of CSD SS):

* ``--student-data-ratio 0`` runs the on-policy batch builder but replaces nothing: its losses
  are bitwise those of the plain off-policy run;
* ``--student-data-ratio 0.5`` (student samples generated every step, temperature 1) gives the
  same losses at TP1, TP2 and PP2 to rtol 1e-5 -- the replaced samples are keyed by (seed,
  iteration, global sample index) and sampling is layout-independent -- and different losses
  from the off-policy run;
* an on-policy run (ratio 1) saved at iteration 2 and resumed from there reproduces the
  straight run's iterations 3-4 and its final validation bitwise.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

RTOL = 1e-5


def _config(workspace, name, *, ratio=None, **sections):
    on_policy = {} if ratio is None else {"student_data_ratio": ratio}
    sections.setdefault("checkpoint", {}).setdefault("save_final", False)
    return tiny_config(workspace, os.path.join(workspace["root"], name), on_policy=on_policy, **sections)


def _metrics(workspace, name) -> list:
    with open(os.path.join(workspace["root"], name, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _world_of_one(rank, world_size, workspace, out_file):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    save_initial_models(workspace)
    record = {}
    for name, ratio in (("off", None), ("zero", 0.0), ("half_tp1", 0.5)):
        result = run_training(_config(workspace, name, ratio=ratio))
        destroy_parallel()
        record[name] = {"train": result.train_losses,
                        "valid": [[v["ce"], v["kd"]] for v in result.validation]}
    record["generated"] = [r.get("generated_samples") for r in _metrics(workspace, "half_tp1")
                           if r["split"] == "train"]
    straight = run_training(_config(workspace, "straight", ratio=1.0, train_iters=4,
                                    checkpoint={"save_interval": 2}))
    destroy_parallel()
    load = os.path.join(workspace["root"], "straight", "checkpoints", "iter_0000002")
    resumed = run_training(_config(workspace, "resumed", ratio=1.0, train_iters=4,
                                   checkpoint={"load": load}))
    destroy_parallel()
    record["straight"] = [straight.train_losses, straight.validation[-1]]
    record["resumed"] = [resumed.train_losses, resumed.validation[-1]]
    record["resumed_grad_norms"] = [[r["grad_norm"] for r in _metrics(workspace, name)
                                     if r["split"] == "train"][-2:] for name in ("straight", "resumed")]
    with open(out_file, "w") as handle:
        json.dump(record, handle)


def _world_of_two(rank, world_size, workspace, out_file):
    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    record = {}
    for name, tp, pp in (("half_tp2", 2, 1), ("half_pp2", 1, 2)):
        result = run_training(_config(workspace, name, ratio=0.5, tp=tp, pp=pp))
        destroy_parallel()
        record[name] = {"train": result.train_losses,
                        "valid": [[v["ce"], v["kd"]] for v in result.validation]}
    if rank == 0:
        with open(out_file, "w") as handle:
            json.dump(record, handle)


@pytest.mark.slow
def test_on_policy_losses_zero_ratio_bitwise_layouts_agree_and_resume_is_bitwise(tmp_path):
    workspace = build_workspace(str(tmp_path))
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    run_distributed(_world_of_one, 1, workspace, one)
    run_distributed(_world_of_two, 2, workspace, two)
    with open(one) as handle:
        record = json.load(handle)
    with open(two) as handle:
        record.update(json.load(handle))

    assert record["zero"] == record["off"]                       # bitwise, validation included
    assert sum(record["generated"]) > 0
    assert record["half_tp1"]["train"] != record["off"]["train"]  # student samples were trained on
    reference = record["half_tp1"]
    for name in ("half_tp2", "half_pp2"):
        assert record[name]["train"] == pytest.approx(reference["train"], rel=RTOL), name
        for got, want in zip(record[name]["valid"], reference["valid"]):
            assert got == pytest.approx(want, rel=RTOL), name

    straight, resumed = record["straight"], record["resumed"]
    assert len(straight[0]) == 4 and len(resumed[0]) == 2
    assert resumed[0] == straight[0][2:]
    assert resumed[1] == straight[1]
    assert record["resumed_grad_norms"][0] == record["resumed_grad_norms"][1]
