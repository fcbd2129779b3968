"""The fused compiled CPU kernels (megatron_csd.losses.compiled) against the chunked eager passes.

The loss tests that take the `kernels` fixture (tests/conftest.py) already run every objective on
both paths against the dense fp64 reference, at TP 1 and TP 2; here: when the kernels are used,
that they really ran, bf16 / fp16 and invalid input against the chunked passes, the one kernel at
TP 1 at a real vocabulary against fp64 and the split kernels, their memory, and what a user sees
when compiling fails.
"""
import json
import subprocess
import sys

import pytest
import torch

from megatron_csd.losses import LossConfig, compiled, csd, distillation_loss, divergences, row_ops

from .cases import ALL_CONFIGS, config_id

KERNELS = {csd: ("csd_local_moments", "csd_gradient"),
           divergences: ("divergence_first_pass", "divergence_second_pass", "divergence_single_pass",
                         "divergence_gradient")}
ONE_KERNEL = ("fkl", "tvd", "jsd", "skl", "srkl")  # one kernel without tensor parallelism


def _awkward_logits(dtype, rows=37, width=300):
    """Every special case at once: -inf columns, an all -inf row, NaN, +inf, NaN facing -inf."""
    gen = torch.Generator().manual_seed(11)
    student = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    student[3, 5] = teacher[4, 7:20] = float("-inf")
    student[5] = float("-inf")
    teacher[6, 9], student[7, 11] = float("nan"), float("inf")
    student[8, 2], teacher[8, 2] = float("nan"), float("-inf")
    return student, teacher


def _loss_and_grad(student, teacher, cfg, vocab_size):
    leaf = student.clone().requires_grad_(True)
    loss = distillation_loss(leaf, teacher, cfg, vocab_size=vocab_size)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()))
    return loss.detach(), leaf.grad


def _two_backwards(student, teacher, cfg, vocab_size):
    """The gradient from one backward and from a second one through the retained graph."""
    leaf = student.clone().requires_grad_(True)
    loss = distillation_loss(leaf, teacher, cfg, vocab_size=vocab_size)
    weights = torch.linspace(0.5, 1.5, loss.numel())
    (first,) = torch.autograd.grad(loss, leaf, weights, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss, leaf, weights)
    return first, second


def _count_kernel_calls(monkeypatch):
    calls = []
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    return calls


# Every objective in fp32; bf16 for the configs test_reference_parity.py already compiles in bf16
# and fp16 for two (each new dtype and objective is a kernel compile of a few seconds in CI).
_LOW_PRECISION = [LossConfig("csd", weights=w) for w in ("SS", "TS", "MM")] + [
    LossConfig(o) for o in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")]
# These again with the kernels tensor parallelism uses (pass 1, [pass 2,] gradient) at TP 1.
_SPLIT = "split"
CASES = ([(c, torch.float32) for c in ALL_CONFIGS if c.objective != "dld"]
         + [(LossConfig(o), _SPLIT) for o in ONE_KERNEL]
         + [(c, torch.bfloat16) for c in _LOW_PRECISION]
         + [(c, torch.float16) for c in (LossConfig("csd", weights="TS"), LossConfig("jsd"))])


@pytest.mark.parametrize("cfg, dtype", CASES, ids=lambda case: config_id(case) if isinstance(case, LossConfig) else str(case))
def test_compiled_kernels_match_the_chunked_passes_on_invalid_and_masked_input(cfg, dtype, monkeypatch):
    split, dtype = dtype == _SPLIT, torch.float32 if dtype == _SPLIT else dtype
    if split:
        monkeypatch.setattr(divergences, "one_kernel", lambda spec, shard: False)
    student, teacher = _awkward_logits(dtype)
    monkeypatch.setattr(compiled, "COMPILED_MIN_ELEMENTS", 1 << 62)
    chunked_loss, chunked_grad = _loss_and_grad(student, teacher, cfg, vocab_size=290)
    monkeypatch.setattr(compiled, "COMPILED_MIN_ELEMENTS", 0)
    calls = _count_kernel_calls(monkeypatch)
    loss, grad = _loss_and_grad(student, teacher, cfg, vocab_size=290)
    if cfg.objective in ONE_KERNEL and not split:
        assert calls == ["divergence_single_pass"], calls
    else:
        assert calls and calls[-1].endswith("gradient"), calls
    first, second = _two_backwards(student, teacher, cfg, vocab_size=290)  # the store recomputed
    torch.testing.assert_close(second, first, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(loss.isnan(), chunked_loss.isnan()) and torch.equal(grad.isnan(), chunked_grad.isnan())
    assert loss[[6, 7, 8]].isnan().all() and loss[5] == 0 and (grad[5] == 0).all() and (grad[:, 290:] == 0).all()
    torch.testing.assert_close(loss, chunked_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    # bf16 / fp16: both paths round the same fp32 gradient once, at most one ulp apart (fp16's
    # subnormals, below 6e-5, are 2^-24 apart).
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    # fp32: srkl's gradient h' - q sum h' cancels, both paths are within 1e-5 of the largest element.
    atol = 1e-5 * chunked_grad.float().nan_to_num().abs().max().item() + (2 ** -24 if dtype == torch.float16 else 0)
    torch.testing.assert_close(grad.float(), chunked_grad.float(), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("objective", ONE_KERNEL)
def test_one_kernel_matches_fp64_and_the_split_kernels_at_a_real_vocabulary(objective, monkeypatch):
    """At V = 32000 with a peaked teacher and a flat student (|log(Z_t / Z_s)| large: the per-row
    constant the one kernel removes from the loss) and with two close distributions (small loss):
    the loss within 5e-5 of fp64, the gradient equal to the split kernels' (TP > 1's)."""
    gen = torch.Generator().manual_seed(5)
    flat, peaked = torch.randn(8, 32000, generator=gen), torch.randn(8, 32000, generator=gen) * 6
    close = torch.randn(8, 32000, generator=gen) * 3
    student = torch.cat((flat, peaked, close))
    teacher = torch.cat((peaked, flat, close * 0.9 + torch.randn(8, 32000, generator=gen) * 0.5))
    cfg = LossConfig(objective)
    monkeypatch.setattr(compiled, "COMPILED_MIN_ELEMENTS", 1 << 62)
    reference, _ = _loss_and_grad(student.double(), teacher.double(), cfg, vocab_size=None)
    monkeypatch.setattr(compiled, "COMPILED_MIN_ELEMENTS", 0)
    calls = _count_kernel_calls(monkeypatch)
    loss, grad = _loss_and_grad(student, teacher, cfg, vocab_size=None)
    assert calls == ["divergence_single_pass"], calls
    torch.testing.assert_close(loss.double(), reference, rtol=5e-5, atol=0)
    monkeypatch.setattr(divergences, "one_kernel", lambda spec, shard: False)
    split_loss, split_grad = _loss_and_grad(student, teacher, cfg, vocab_size=None)
    torch.testing.assert_close(loss, split_loss, rtol=5e-5, atol=0)
    torch.testing.assert_close(grad, split_grad, rtol=1e-5, atol=1e-5 * split_grad.abs().max().item())


def test_compiled_kernels_apply_to_large_cpu_logits_only(monkeypatch):
    monkeypatch.delenv(compiled.ENV_SWITCH, raising=False)
    rows = compiled.COMPILED_MIN_ELEMENTS // 1000 + 1
    large, small = torch.empty(rows, 1000), torch.empty(4, 1000)
    assert compiled.use_compiled(large, 1000) and compiled.use_compiled(large.bfloat16(), 1000)
    assert not compiled.use_compiled(small, 1000)
    assert not compiled.use_compiled(large.double(), 1000)  # fp64 (gradcheck) keeps the eager passes
    assert not compiled.use_compiled(torch.empty(rows, 1000, device="meta"), 1000)  # only CPU tensors
    assert not compiled.use_compiled(large, 0)
    seen_in_worker = []
    monkeypatch.setattr(row_ops, "LOSS_THREADS", 2)
    row_ops.for_each_chunk(4 * row_ops.CHUNK_ELEMENTS // 1000, 1000,  # 4 chunks, 2 workers
                           lambda *_: seen_in_worker.append(compiled.use_compiled(large, 1000)), torch.float32,
                           large.device)
    assert seen_in_worker and not any(seen_in_worker)
    monkeypatch.setenv(compiled.ENV_SWITCH, "0")
    assert not compiled.use_compiled(large, 1000)


def test_a_failed_compile_is_one_clear_error(monkeypatch):
    def broken_compile(function, **_):
        def run(*args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(function, RuntimeError("no C++ compiler found"), None)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = compiled.fused_kernel(lambda logits: logits + 1)
    with pytest.raises(RuntimeError, match="install a C\\+\\+ compiler .* or set MEGATRON_CSD_COMPILE=0"):
        kernel(torch.zeros(2))
    assert torch.equal(kernel.eager(torch.zeros(2)), torch.ones(2))


_MEMORY_CHILD = """
import json, sys, torch
from megatron_csd.losses import LossConfig, compiled, distillation_loss
compiled.COMPILED_MIN_ELEMENTS = 0
cfg = LossConfig(**json.loads(sys.argv[1]))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def run(rows):
    leaf = student[:rows].clone().requires_grad_(True) if rows < len(student) else student.requires_grad_(True)
    distillation_loss(leaf, teacher[:rows], cfg).sum().backward()
gen = torch.Generator().manual_seed(0)
student, teacher = torch.randn(1024, 16384, generator=gen), torch.randn(1024, 16384, generator=gen)
run(64)  # compiles the kernels
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
run(1024)
print(json.dumps((status("VmHWM") - before) / (1024 * 16384 * 4)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("objective, weights", [("csd", "TS"), ("jsd", "SS"), ("rkl", "SS"), ("fkl", "SS")])
def test_compiled_kernels_keep_one_logits_sized_buffer(objective, weights):
    """Peak RSS of forward + backward over the inputs: the gradient itself and nothing else of
    [rows, V] size (Inductor must not keep any intermediate; the chunked passes hold 1.0-1.07)."""
    config = json.dumps({"objective": objective, "weights": weights})
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, config], capture_output=True, text=True, check=True)
    buffers = json.loads(out.stdout.strip().splitlines()[-1])
    assert buffers <= 1.1, f"{objective}-{weights}: {buffers:.2f} [rows, V] fp32 buffers at peak"
