"""One optimizer step, looked at closely (world of 1, tiny models, CPU).

- gradient clipping fires: the logged grad norm is the pre-clip global norm, and the gradients
  the optimizer steps with are ``torch.nn.utils.clip_grad_norm_`` of the same gradients;
- the frozen teacher hears ``set_is_first_microbatch`` once per training step and once per
  evaluation pass (what an FP8 teacher needs to cache its weight casts per pass);
- ``teacher_forward_s`` is measured (CPU wall time) and part of the step time;
- relaunching a finished run with ``--load`` of its own save dir re-saves nothing.
"""
from __future__ import annotations

import json
import os

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

CLIP = 1e-3  # far below the gradient norm of an untrained model: every step is clipped


def _steps(rank, world_size, workspace, out_file):
    import torch

    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import Trainer

    save_initial_models(workspace)
    output_dir = os.path.join(workspace["root"], "run")
    config = tiny_config(workspace, output_dir, train_iters=2, global_batch_size=2,
                         optimizer={"clip_grad": CLIP},
                         training={"eval_samples": 2, "eval_at_start": True})
    trainer = Trainer(config)

    first_microbatch_calls = []
    teacher = trainer.stage.teacher
    original_mark = teacher.set_is_first_microbatch
    teacher.set_is_first_microbatch = lambda: (first_microbatch_calls.append(trainer.iteration),
                                               original_mark())[1]

    params = [p for p in trainer.ddp.parameters() if p.requires_grad]
    clip_checks = []
    original_step = trainer.optimizer.step

    def checked_step():
        reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for ref, p in zip(reference, params):
            ref.grad = p.main_grad.detach().clone()
        total_norm = float(torch.nn.utils.clip_grad_norm_(reference, CLIP))
        update_ok, grad_norm, zeros = original_step()
        clipped = [p.grad for p in params]  # FP32Optimizer steps with grad = main_grad, clipped in place
        clip_checks.append({
            "total_norm": total_norm, "grad_norm": float(grad_norm),
            "max_diff": max(float((a - r.grad).abs().max()) for a, r in zip(clipped, reference)),
            "clipped_norm": float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in clipped]))),
        })
        return update_ok, grad_norm, zeros

    trainer.optimizer.step = checked_step
    result = trainer.run()
    destroy_parallel()
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        train_records = [r for r in map(json.loads, handle) if r["split"] == "train"]
    checkpoint = result.checkpoint
    stamp = os.stat(os.path.join(checkpoint, "trainer_state.json")).st_mtime_ns

    # Relaunch the finished run into its own save dir: nothing is trained or re-saved.
    again = Trainer(tiny_config(workspace, output_dir, train_iters=2, global_batch_size=2,
                                optimizer={"clip_grad": CLIP},
                                training={"eval_samples": 2, "eval_at_start": True},
                                checkpoint={"load": config.checkpoint.save}))
    relaunch = again.run()
    destroy_parallel()
    with open(out_file, "w") as handle:
        json.dump({
            "calls": first_microbatch_calls, "clip": clip_checks, "train": train_records,
            "validations": len(result.validation), "checkpoint": checkpoint,
            "relaunch_checkpoint": relaunch.checkpoint, "relaunch_losses": relaunch.train_losses,
            "stamp_before": stamp,
            "stamp_after": os.stat(os.path.join(checkpoint, "trainer_state.json")).st_mtime_ns,
            "dirs": sorted(set(os.listdir(config.checkpoint.save)) - {"megatron_csd.lock"}),
        }, handle)


def test_clipping_first_microbatch_marks_teacher_time_and_relaunch(tmp_path):
    workspace = build_workspace(str(tmp_path), num_train=16, num_valid=4)
    out_file = str(tmp_path / "steps.json")
    run_distributed(_steps, 1, workspace, out_file)
    with open(out_file) as handle:
        record = json.load(handle)

    # Clipping: Megatron's norm is the pre-clip global norm and the stepped gradients are
    # torch's clip_grad_norm_ of the same gradients (norm CLIP after clipping).
    assert len(record["clip"]) == 2
    for check, logged in zip(record["clip"], record["train"]):
        assert check["total_norm"] > 10 * CLIP
        assert abs(check["grad_norm"] - check["total_norm"]) <= 1e-5 * check["total_norm"]
        assert logged["grad_norm"] == check["grad_norm"]
        assert check["max_diff"] <= 1e-9
        assert abs(check["clipped_norm"] - CLIP) <= 1e-3 * CLIP

    # set_is_first_microbatch: before eval at 0, before steps 1 and 2 (iteration counted
    # before the step), before the final eval at 2.
    assert record["calls"] == [0, 0, 1, 2]
    assert record["validations"] == 2

    # Teacher time: measured, and within the step time.
    for logged in record["train"]:
        assert 0 < logged["teacher_forward_s"] < logged["step_time_s"]

    # Relaunch: resumed at the end, no training, the same checkpoint untouched.
    assert record["relaunch_losses"] == []
    assert record["relaunch_checkpoint"] == record["checkpoint"]
    assert record["stamp_after"] == record["stamp_before"]
    assert record["dirs"] == ["iter_0000002", "latest"]
