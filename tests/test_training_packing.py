"""Packed rows through the whole distillation step: exact per sample, isolated, at TP / SP / PP.

For a packed row of several samples and each sample k of it, the step run on the row with
loss_mask restricted to sample k must give the same response loss and the same student gradient
(rtol 1e-5, fp32) as sample k run alone, unpacked (one sample per row, the attention layer's own
causal mask, positions 0..s-1) -- for csd SS, csd TS and fkl, at TP1, TP2 + sequence
parallelism and PP2. Because the loss is per token, equal per-sample losses and gradients for
every k give equal losses and gradients for any mask, i.e. for the whole packed batch.
"""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from tests.spawn import run_distributed
from tests.test_training_common import build_workspace, save_initial_models, tiny_config

PACKED_SEQ = 96
OBJECTIVES = [("csd", "SS"), ("csd", "TS"), ("fkl", "SS")]
RTOL = 1e-5


def _trainer(workspace, name, tp, pp, sp, fused=True):
    from megatron_csd.training.trainer import Trainer

    config = tiny_config(workspace, os.path.join(workspace["root"], f"run_{name}"), tp=tp, pp=pp,
                         parallel={"sequence_parallel": sp}, loss={"fused_output_loss": fused},
                         training={"packing": True, "seq_length": PACKED_SEQ})
    return Trainer(config)


def _step(trainer, batch, objective):
    """(mean response loss, response tokens, [student grads]) of one forward-backward."""
    from megatron_csd.losses import LossConfig

    trainer.spec = dataclasses.replace(trainer.spec, loss_config=LossConfig(
        objective=objective[0], weights=objective[1]))
    trainer.ddp.zero_grad_buffer()
    device_batch = {k: v.unsqueeze(0).to(trainer.ctx.device) for k, v in batch.items()}
    outputs = trainer._forward_backward(iter([device_batch]), 1, forward_only=False)
    stats = trainer._reduce(outputs, evaluating=False)
    grads = [p.main_grad.detach().clone() for p in trainer.ddp.parameters()]
    return stats["loss"], stats["tokens"], grads


def _check_layout(trainer, num_checked):
    import torch

    packed = trainer.train_batches.dataset
    dataset = packed.dataset
    row_index = max(range(len(packed)), key=lambda b: len(packed.bins[b]))
    members = packed.bins[row_index]
    assert len(members) >= 3, "the test needs a row of several samples"
    row = packed[row_index]
    for objective in OBJECTIVES:
        for k, sample_index in enumerate(members[:num_checked]):
            only_k = dict(row, loss_mask=row["loss_mask"] * (row["segment_ids"] == k))
            got = _step(trainer, only_k, objective)
            want = _step(trainer, dataset[sample_index], objective)
            assert got[1] == want[1] > 0
            assert got[0] == pytest.approx(want[0], rel=RTOL), (objective, k)
            for g, w in zip(got[2], want[2]):
                torch.testing.assert_close(g, w, rtol=RTOL, atol=RTOL * float(w.abs().max()) + 1e-12)


def _reference_body(rank, world_size, workspace):
    """World of 1: checkpoints, TP1 exactness, and the isolation check on the logits."""
    import torch

    from megatron_csd.models.packed_attention import block_causal_mask
    from megatron_csd.parallel.initialize import destroy_parallel

    save_initial_models(workspace)
    _check_layout(_trainer(workspace, "tp1_unfused", 1, 1, False, fused=False), num_checked=3)
    destroy_parallel()
    trainer = _trainer(workspace, "tp1", 1, 1, False)  # the fused output layer + loss (default)
    _check_layout(trainer, num_checked=3)

    # Isolation: changing sample 0's tokens moves no logit of sample 1 (and the check can fail:
    # without the block mask sample 1 does see the change).
    packed = trainer.train_batches.dataset
    row = packed[max(range(len(packed)), key=lambda b: len(packed.bins[b]))]
    seg = row["segment_ids"]
    changed = row["tokens"].clone()
    changed[seg == 0] = (changed[seg == 0] + 7) % 100 + 3
    trainer.stage.eval()

    def logits(tokens, mask):
        with torch.no_grad():
            student, teacher = trainer.stage(tokens.unsqueeze(0), row["position_ids"].unsqueeze(0), mask,
                                             capture_heads=False)  # logits, also with the fused loss
        return torch.cat([student, teacher], dim=-1)[0]

    mask = block_causal_mask(seg.unsqueeze(0))
    before, after = logits(row["tokens"], mask), logits(changed, mask)
    assert not torch.equal(before[seg == 0], after[seg == 0])
    assert torch.equal(before[seg == 1], after[seg == 1]), "sample 1 attends to sample 0"
    leaky_before, leaky_after = logits(row["tokens"], None), logits(changed, None)
    assert not torch.allclose(leaky_before[seg == 1], leaky_after[seg == 1])
    destroy_parallel()
    _run_and_resume_with_packing(workspace)


def _run_and_resume_with_packing(workspace):
    """`--packing` end to end: the start-up padding report, finite losses, a resume that
    continues exactly (the sampler's cursor walks packed rows)."""
    import contextlib
    import io
    import math

    from megatron_csd.parallel.initialize import destroy_parallel
    from megatron_csd.training.trainer import run_training

    def config(name, **checkpoint):
        return tiny_config(workspace, os.path.join(workspace["root"], name), train_iters=4,
                           training={"packing": True, "seq_length": PACKED_SEQ, "eval_interval": 0},
                           logging={"quiet": False}, checkpoint=checkpoint)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        straight = run_training(config("packed_straight", save_interval=2)).train_losses
    destroy_parallel()
    assert "packing:" in printed.getvalue() and "% packed" in printed.getvalue()
    assert len(straight) == 4 and all(math.isfinite(x) for x in straight)
    load = os.path.join(workspace["root"], "packed_straight", "checkpoints", "iter_0000002")
    resumed = run_training(config("packed_resumed", load=load)).train_losses
    destroy_parallel()
    assert resumed[-2:] == straight[-2:]


def _parallel_body(rank, world_size, workspace):
    from megatron_csd.parallel.initialize import destroy_parallel

    for name, tp, pp, sp in (("tp2_sp", 2, 1, True), ("pp2", 1, 2, False)):
        _check_layout(_trainer(workspace, name, tp, pp, sp), num_checked=2)
        destroy_parallel()


@pytest.fixture(scope="module")
def packing_workspace(tmp_path_factory):
    workspace = build_workspace(str(tmp_path_factory.mktemp("packing")))
    run_distributed(_reference_body, 1, workspace)
    return workspace


@pytest.mark.slow
def test_packing_exact_per_sample_and_isolated_at_tp1(packing_workspace):
    pass  # the checks run in the fixture's world of one (it also writes the checkpoints)


@pytest.mark.slow
def test_packing_exact_per_sample_at_tp2_sp_and_pp2(packing_workspace):
    run_distributed(_parallel_body, 2, packing_workspace)


def test_packing_refused_with_on_policy_options():
    from types import SimpleNamespace

    from megatron_csd.training.packing_setup import training_rows

    config = SimpleNamespace(training=SimpleNamespace(packing=True, seed=1),
                             on_policy=SimpleNamespace(enabled=True))
    with pytest.raises(ValueError, match="--packing does not combine with the on-policy options"):
        training_rows(config, dataset=None, writer=None)
