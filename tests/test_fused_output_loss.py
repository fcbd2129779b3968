"""The fused output layer + loss equals today's unfused path (logits, then objective.loss_func).

One 1-process gloo world (Megatron's CE needs its TP group) runs every objective and CSD
weighting, kd_ratio 0.5, SFT and evaluation through both paths on random hidden states and
weights with a padded vocabulary, masked tokens and several token chunks: loss sum, every metric,
per-token values and the gradients of the hidden states and the output weight agree to rtol 1e-5
(fp32). The gradient lands in ``main_grad`` when the weight has one (Megatron DDP) with a zero
``.grad`` that still carries a tied embedding's other gradient; fp16 with a loss scale and bf16
are checked against the unfused path in the same dtype. Layouts (TP/SP/PP) are in
test_fused_output_loss_layouts.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.spawn import run_distributed

VOCAB, PADDED, SEQ, BATCH, HIDDEN, TEACHER_HIDDEN = 37, 48, 7, 3, 8, 12
CASES = [("csd", "SS", 1.0), ("csd", "TS", 1.0), ("csd", "US", 1.0), ("csd", "MM", 1.0), ("fkl", "SS", 1.0),
         ("rkl", "SS", 1.0), ("jsd", "SS", 1.0), ("tvd", "SS", 1.0), ("skl", "SS", 1.0), ("dld", "SS", 1.0),
         ("csd", "SS", 0.5), ("rkl", "SS", 0.5), (None, None, 1.0)]


def _spec(objective, weights, kd_ratio):
    from megatron.core import parallel_state

    from megatron_csd.losses import LossConfig
    from megatron_csd.training.objective import ObjectiveSpec

    config = None if objective is None else LossConfig(objective=objective, weights=weights, temperature=1.5)
    return ObjectiveSpec(distill=objective is not None, loss_config=config, kd_ratio=kd_ratio,
                         vocab_size=VOCAB, padded_vocab_size=PADDED,
                         tp_group=parallel_state.get_tensor_model_parallel_group(), tp_rank=0, tp_size=1)


def _inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    weight = torch.randn(PADDED, HIDDEN, generator=generator)
    weight[VOCAB:] *= 8  # padded columns with large logits must not count
    teacher_hidden = torch.randn(SEQ, BATCH, TEACHER_HIDDEN, generator=generator)
    teacher_weight = torch.randn(PADDED, TEACHER_HIDDEN, generator=generator)
    mask = torch.rand(BATCH, SEQ, generator=generator) > 0.3
    mask[1] = False  # a sequence without response tokens
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    batch = {"labels": torch.where(mask, labels, torch.full_like(labels, -1)), "loss_mask": mask.float()}
    cast = lambda t: t.to(dtype)  # noqa: E731
    return (cast(hidden).requires_grad_(), cast(weight).requires_grad_(), cast(teacher_hidden),
            cast(teacher_weight), batch)


def _unfused(hidden, weight, teacher_hidden, teacher_weight, batch, spec, evaluating):
    from megatron_csd.training.objective import loss_func

    logits = torch.matmul(hidden, weight.t()).transpose(0, 1).contiguous()  # GPTModel's [b, s, V]
    teacher = torch.matmul(teacher_hidden, teacher_weight.t()).transpose(0, 1).contiguous()
    return loss_func(batch, teacher if spec.distill else None, spec, evaluating, logits)


def _fused(hidden, weight, teacher_hidden, teacher_weight, batch, spec, evaluating, chunk_tokens=4):
    from megatron_csd.models.output_capture import HeadInputs
    from megatron_csd.training.fused_objective import FusedHeads, fused_loss_func

    heads = FusedHeads(HeadInputs(hidden, weight, False, None),
                       HeadInputs(teacher_hidden, teacher_weight, False, None) if spec.distill else None)
    chunk_bytes = chunk_tokens * 4 * weight.shape[0]
    import megatron_csd.training.fused_loss as fused_loss

    saved, fused_loss.CHUNK_BYTES = fused_loss.CHUNK_BYTES, chunk_bytes
    try:
        return fused_loss_func(batch, heads, spec, evaluating)
    finally:
        fused_loss.CHUNK_BYTES = saved


def close(got, want, name, rtol=1e-5):
    """rtol, plus an atol of rtol x the largest |want|: fp32 sums in another order (one GEMM vs
    chunk-wise accumulation) differ by rounding that cancellation can make large *relatively*."""
    atol = rtol * float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _grads(path, tensors, spec, evaluating=False, scale=1.0):
    hidden, weight = (t.detach().clone().requires_grad_() for t in tensors[:2])
    loss_sum, num_tokens, metrics = path(hidden, weight, *tensors[2:], spec, evaluating)
    (loss_sum * scale).backward()
    return loss_sum.detach(), metrics, hidden.grad, weight.grad


def _parity_checks(rank, world_size):
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel
    from megatron_csd.training.fused_loss import fused_output_loss
    from megatron_csd.models.output_capture import HeadInputs

    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=1)
    tensors = _inputs()
    for objective, weights, kd_ratio in CASES:
        spec = _spec(objective, weights, kd_ratio)
        name = f"{objective} {weights} kd_ratio={kd_ratio}"
        want = _grads(_unfused, tensors, spec)
        got = _grads(_fused, tensors, spec)
        close(got[0], want[0], name)
        assert list(got[1]) == list(want[1]), name
        for key in want[1]:
            close(got[1][key], want[1][key], f"{name} {key}")
        close(got[2], want[2], f"{name} hidden grad")
        close(got[3], want[3], f"{name} weight grad")
        assert got[3][VOCAB:].abs().max() == 0, "a padded column received gradient"
        with torch.no_grad():  # evaluation: teacher CE too, no gradient work
            fused_eval = _fused(*tensors, spec, True)
            unfused_eval = _unfused(*tensors, spec, True)
        for key in unfused_eval[2]:
            close(fused_eval[2][key], unfused_eval[2][key], f"{name} eval {key}")
        # Per-token values, not only their sums.
        hidden, weight, teacher_hidden, teacher_weight, batch = tensors
        mask = batch["loss_mask"] > 0
        labels = torch.where(mask, batch["labels"], torch.zeros_like(batch["labels"]))
        with torch.no_grad():
            _, stats = fused_output_loss(HeadInputs(hidden, weight, False, None),
                                         HeadInputs(teacher_hidden, teacher_weight, False, None) if spec.distill else None,
                                         labels, mask, spec, evaluating=True)
            logits = torch.matmul(hidden, weight.t()).transpose(0, 1).contiguous()
            teacher = torch.matmul(teacher_hidden, teacher_weight.t()).transpose(0, 1).contiguous()
            from megatron_csd.training.objective import response_cross_entropy
            close(stats.ce, response_cross_entropy(logits, labels, spec), f"{name} per-token ce")
            if spec.distill:
                from megatron_csd.losses import distillation_loss
                kd = distillation_loss(logits, teacher, spec.loss_config, vocab_size=VOCAB)
                close(stats.kd, kd, f"{name} per-token kd")
                close(stats.teacher_ce, response_cross_entropy(teacher, labels, spec), f"{name} teacher ce")

    # main_grad (Megatron DDP): fp32 accumulation into the buffer, a zero .grad that still
    # carries the tied embedding lookup's gradient of the same parameter.
    spec = _spec("csd", "TS", 0.5)
    want = _grads(_unfused, tensors, spec, scale=3.0)
    hidden = tensors[0].detach().clone().requires_grad_()
    weight = tensors[1].detach().clone().requires_grad_()
    weight.main_grad = torch.full(weight.shape, 0.25)
    ids = torch.tensor([1, 2, 2])
    loss_sum, _, _ = _fused(hidden, weight, *tensors[2:], spec, False)
    (loss_sum * 3.0 + torch.nn.functional.embedding(ids, weight).sum()).backward()
    lookup = torch.zeros_like(weight)
    lookup.index_add_(0, ids, torch.ones(3, HIDDEN))
    close(weight.main_grad, want[3] + 0.25, "main_grad")
    torch.testing.assert_close(weight.grad, lookup, rtol=0, atol=0)
    close(hidden.grad, want[2], "hidden grad with main_grad")

    # bf16 and fp16 (with a loss scale of 1024): the same dtype's unfused path, loosely.
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        low = _inputs(dtype)
        want = _grads(_unfused, low, spec, scale=1024.0)
        got = _grads(_fused, low, spec, scale=1024.0)
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
        for index in (2, 3):
            assert got[index].dtype == dtype and torch.isfinite(got[index].float()).all()
            torch.testing.assert_close(got[index].float(), want[index].float(), rtol=tol,
                                       atol=tol * want[index].float().abs().max().item())
    destroy_parallel()


@pytest.mark.slow
def test_fused_matches_unfused_every_objective_tp1():
    run_distributed(_parity_checks, 1)


def test_fused_output_loss_switch_parses_and_defaults_on():
    from megatron_csd.training.config_io import build_arg_parser

    parser = build_arg_parser()
    assert parser.parse_args(["--fused-output-loss", "false"]).__dict__["loss.fused_output_loss"] is False
    assert parser.parse_args(["--fused-output-loss"]).__dict__["loss.fused_output_loss"] is True
    from megatron_csd.training.config import LossSection

    assert LossSection().fused_output_loss is True
    with pytest.raises(TypeError, match="fused_output_loss"):
        LossSection(fused_output_loss="yes")


def test_fused_head_unsupported_layer_falls_back_with_warning():
    from types import SimpleNamespace

    from megatron_csd.models.output_capture import OutputCapture, fused_head_problem
    from megatron_csd.training.stage import fused_head_supported

    layer = SimpleNamespace(bias=torch.zeros(3), gather_output=False, sequence_parallel=False)
    model = SimpleNamespace(output_layer=layer, config=SimpleNamespace(mtp_num_layers=None))
    assert "bias" in fused_head_problem(model)
    with pytest.warns(UserWarning, match="fused output-layer loss off"):
        assert fused_head_supported(model, None) is False
    with pytest.raises(ValueError, match="--fused-output-loss false"):
        OutputCapture(model)
    layer.bias = None
    assert fused_head_problem(model) is None and fused_head_supported(model, None) is True
    assert fused_head_supported(SimpleNamespace(output_layer=None), None) is True  # not the last stage


@pytest.mark.slow
def test_fused_peak_memory_is_below_a_quarter_of_unfused(tmp_path):
    """tools/bench_loss.py --fused in fresh processes: the keys, and fused peak RSS <= 25% of
    unfused (1024 tokens x V 32000, a 65-token chunk: the target shape's chunk share, ~6%)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "fused.json"
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(root, "tools", "bench_loss.py"), "--fused", "--tokens", "1024",
                    "--vocab", "32000", "--tp", "1", "--threads", "1", "--chunk-mb", "8", "--repeats", "1",
                    "--json", str(out)], check=True, env=env, cwd=root, capture_output=True)
    result = json.loads(out.read_text())
    for key in ("unfused_peak_mb", "fused_peak_mb", "unfused_ms", "fused_ms", "buffer_mb", "load_before"):
        assert key in result, key
    assert result["unfused_peak_mb"] > 3 * result["buffer_mb"]  # the logits really were formed
    assert result["fused_peak_mb"] <= 0.25 * result["unfused_peak_mb"], result


def test_fused_logged_cross_entropy_matches_dense_over_chunks():
    from megatron_csd.losses.chunked_ce import ChunkedCrossEntropy
    from megatron_csd.losses.vocab_shard import describe_shard

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(10, PADDED, generator=generator, dtype=torch.float64).float() * 4
    logits[:, VOCAB:] = 60.0  # padding never counts
    logits[3, :VOCAB:2] = float("-inf")  # masked columns are probability 0
    labels = torch.randint(0, VOCAB, (10,), generator=generator)
    labels[3] = 1
    logits[7, 5] = float("nan")
    ce = ChunkedCrossEntropy(10, describe_shard(PADDED, None, VOCAB), torch.float32, "cpu")
    for start in range(0, 10, 4):
        ce.add(start, logits[start:start + 4], labels[start:start + 4])
    got = ce.finish()
    want = torch.nn.functional.cross_entropy(logits[:, :VOCAB].double(), labels, reduction="none")
    keep = torch.arange(10) != 7
    torch.testing.assert_close(got[keep].double(), want[keep], rtol=1e-6, atol=1e-6)
    assert torch.isnan(got[7]), "NaN logits must give a NaN CE, never a number"
