"""Every objective against the dense fp64 reference: loss and gradient, odd shapes, padding, -inf."""
import pytest
import torch

from megatron_csd.losses import LossConfig, distillation_loss

from .cases import ALL_CONFIGS, config_id
from .dense_reference import dense_loss_and_grad


def _run(student, teacher, cfg, vocab_size=None, grad_weights=None):
    leaf = student.clone().requires_grad_(True)
    loss = distillation_loss(leaf, teacher, cfg, vocab_size=vocab_size)
    weights = torch.ones_like(loss) if grad_weights is None else grad_weights
    (loss * weights).sum().backward()
    return loss, leaf.grad


def _assert_matches(student, teacher, cfg, vocab_size=None, grad_weights=None, rtol=1e-5, atol=1e-6):
    loss, grad = _run(student, teacher, cfg, vocab_size, grad_weights)
    ref_loss, ref_grad = dense_loss_and_grad(student, teacher, cfg, vocab_size, grad_weights)
    assert loss.dtype == (torch.float64 if student.dtype == torch.float64 else torch.float32)
    assert grad.dtype == student.dtype and grad.shape == student.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=config_id)
def test_loss_and_grad_match_dense_reference(cfg, kernels):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 5, 37, generator=gen) * 3
    teacher = torch.randn(3, 5, 37, generator=gen) * 3
    upstream = torch.rand(3, 5, generator=gen)
    _assert_matches(student, teacher, cfg, grad_weights=upstream)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=config_id)
def test_padding_and_masked_columns_match_reference(cfg, kernels):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(6, 29, generator=gen) * 2
    teacher = torch.randn(6, 29, generator=gen) * 2
    student[0, 3] = float("-inf")                  # masked in the student only
    teacher[1, [4, 7]] = float("-inf")             # masked in the teacher only
    student[2, 5], teacher[2, 5] = float("-inf"), float("-inf")
    teacher[3, :] = float("-inf")                  # no usable column: loss 0, grad 0
    student[4, 25:] = 1e4                          # padded columns with huge values must not matter
    teacher[4, 26:] = -1e4
    _assert_matches(student, teacher, cfg, vocab_size=24, grad_weights=torch.rand(6, generator=gen))
    loss, grad = _run(student, teacher, cfg, vocab_size=24)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert loss[3] == 0 and (grad[3] == 0).all()
    assert (grad[:, 24:] == 0).all(), "padded columns must get zero gradient"
    assert grad[0, 3] == 0 and grad[1, 4] == 0 and grad[2, 5] == 0


@pytest.mark.parametrize("objective", ["csd", "fkl", "jsd", "tvd", "dld"])
def test_single_column_and_single_row_edge_shapes(objective):
    cfg = LossConfig(objective)
    for shape in [(1, 1), (1, 2), (4, 1), (7,)]:
        student, teacher = torch.randn(shape), torch.randn(shape)
        _assert_matches(student, teacher, cfg)


def test_many_rows_cross_chunk_boundaries(kernels):
    """Rows >> chunk size exercise the chunk loop, with masked rows scattered across chunks."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(300, 1000, generator=gen)
    teacher = torch.randn(300, 1000, generator=gen)
    student[::37, 11] = float("-inf")
    for cfg in (LossConfig("csd", weights="SS"), LossConfig("csd", weights="UT"), LossConfig("jsd")):
        loss, grad = _run(student, teacher, cfg)
        ref_loss, ref_grad = dense_loss_and_grad(student, teacher, cfg) if cfg.objective != "csd" else (None, None)
        if ref_loss is None:  # the O(V^2) reference is too slow here; compare rows against a small-batch run
            for rows in (slice(0, 7), slice(148, 153), slice(290, 300)):
                small_loss, small_grad = dense_loss_and_grad(student[rows], teacher[rows], cfg)
                torch.testing.assert_close(loss[rows].double(), small_loss, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(grad[rows].double(), small_grad, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cfg", [LossConfig("csd", weights="SS"), LossConfig("csd", weights="TS", temperature=2.0),
                                 LossConfig("csd", weights="MM"), LossConfig("rkl"), LossConfig("jsd"),
                                 LossConfig("dld")], ids=config_id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_fp32(cfg, dtype):
    gen = torch.Generator().manual_seed(4)
    student = (torch.randn(8, 300, generator=gen) * 4).to(dtype)
    teacher = (torch.randn(8, 300, generator=gen) * 4).to(dtype)
    loss, grad = _run(student, teacher, cfg)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Reference on the same (already rounded) values: only the gradient's final rounding differs.
    ref_loss, ref_grad = dense_loss_and_grad(student, teacher, cfg)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


def test_large_logit_gaps_keep_precision(kernels):
    """|d| ~ 1e3: offsets between the models, large spreads, confident disagreement.

    Tolerances follow what fp32 can resolve. "offset" (constant offsets of +-1000, gaps that vary
    by ~0.1) must be exact to 2e-5: the max shift removes the offset. "spread" has fp32 logits near
    3000 (one ulp = 2.4e-4) but gaps ~1, and "opposed" has a confidently wrong student whose
    dominant column's gap is ~1400 (one ulp = 1.2e-4), so there the gradient is held to a few
    ulps of the shifted gap's magnitude.
    """
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4, 200, generator=gen)
    cases = {
        "offset": (base * 5 + 1000.0, base * 5 - 1000.0 + 0.1 * torch.randn(4, 200, generator=gen)),
        "spread": (base * 1000.0, base * 1000.0 + torch.randn(4, 200, generator=gen)),
        "opposed": (base * 300.0, -base * 300.0),
    }
    for name, (student, teacher) in cases.items():
        shifted = torch.cat((student - student.amax(-1, keepdim=True), teacher - teacher.amax(-1, keepdim=True)))
        ulp = torch.finfo(torch.float32).eps * shifted.abs().max().item()  # resolution of the shifted logits
        for cfg in (LossConfig("csd", weights="SS"), LossConfig("csd", weights="UU"),
                    LossConfig("csd", weights="TS", temperature=50.0), LossConfig("dld")):
            loss, grad = _run(student, teacher, cfg)
            ref_loss, ref_grad = dense_loss_and_grad(student, teacher, cfg)
            assert torch.isfinite(loss).all(), name
            loss_tol = dict(rtol=2e-5 if name == "offset" else 1e-4, atol=1e-6 * ref_loss.abs().max().item())
            grad_tol = dict(rtol=2e-5, atol=1e-6 * ref_grad.abs().max().item())
            if name != "offset":  # a gradient element is 2 w_k (d_k - m): a few ulps times the largest weight
                max_weight = 1.0 / student.shape[-1] if cfg.weights == "UU" or cfg.objective == "dld" else 1.0
                grad_tol = dict(rtol=1e-4, atol=max(grad_tol["atol"], 4 * ulp * max_weight))
            torch.testing.assert_close(loss.double(), ref_loss, **loss_tol, msg=lambda m: f"{name} {config_id(cfg)}: {m}")
            torch.testing.assert_close(grad.double(), ref_grad, **grad_tol, msg=lambda m: f"{name} {config_id(cfg)}: {m}")


@pytest.mark.parametrize("cfg", [LossConfig(o) for o in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "dld")]
                         + [LossConfig("csd", weights=w) for w in ("SS", "TS", "MM")], ids=config_id)
def test_low_precision_gradients_are_the_rounded_fp32_gradients(cfg, kernels):
    """bf16 logits: the gradient must be the fp32-accurate one, rounded once to bf16 (so within
    two bf16 ulps of the rounded fp64 reference); a gap taken in bf16 would be off by far more."""
    gen = torch.Generator().manual_seed(6)
    student = (torch.randn(16, 400, generator=gen) * 4).to(torch.bfloat16)
    teacher = (torch.randn(16, 400, generator=gen) * 4).to(torch.bfloat16)
    _, grad = _run(student, teacher, cfg)
    _, ref_grad = dense_loss_and_grad(student, teacher, cfg)
    rounded = ref_grad.to(torch.bfloat16).double()
    torch.testing.assert_close(grad.double(), rounded, rtol=2 ** -7, atol=1e-6 * rounded.abs().max().item())
