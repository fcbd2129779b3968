"""Identities from csd-math.md, gradcheck, input immutability, and argument errors."""
import pytest
import torch

from megatron_csd.losses import LossConfig, distillation_loss

from .cases import ALL_CONFIGS, config_id


def _loss_and_grad(student, teacher, cfg, **kwargs):
    leaf = student.clone().requires_grad_(True)
    loss = distillation_loss(leaf, teacher, cfg, **kwargs)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _logits(rows=6, vocab=50, seed=0, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * scale).to(dtype), (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)


def test_ss_at_half_scale_has_exactly_the_reverse_kl_gradient():
    student, teacher = _logits(dtype=torch.float64)
    _, csd_grad = _loss_and_grad(student, teacher, LossConfig("csd", weights="SS", scale=0.5))
    _, rkl_grad = _loss_and_grad(student, teacher, LossConfig("rkl"))
    torch.testing.assert_close(csd_grad, rkl_grad, rtol=1e-10, atol=1e-12)


def test_ss_loss_is_the_student_weighted_variance_of_the_gap():
    student, teacher = _logits(dtype=torch.float64)
    loss, _ = _loss_and_grad(student, teacher, LossConfig("csd", weights="SS"))
    q = torch.softmax(student, -1)
    gap = student - teacher
    variance = (q * gap ** 2).sum(-1) - (q * gap).sum(-1) ** 2
    torch.testing.assert_close(loss, variance, rtol=1e-10, atol=1e-12)


def test_uu_gradient_is_centred_logit_difference():
    student, teacher = _logits(dtype=torch.float64)
    _, grad = _loss_and_grad(student, teacher, LossConfig("csd", weights="UU"))
    vocab = student.shape[-1]
    expected = (2.0 / vocab) * ((student - student.mean(-1, keepdim=True)) - (teacher - teacher.mean(-1, keepdim=True)))
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pair", [("TS", "ST"), ("US", "SU"), ("UT", "TU")])
def test_weight_pair_order_does_not_matter(pair):
    student, teacher = _logits(dtype=torch.float64)
    first = _loss_and_grad(student, teacher, LossConfig("csd", weights=pair[0], temperature=1.7))
    second = _loss_and_grad(student, teacher, LossConfig("csd", weights=pair[1], temperature=1.7))
    torch.testing.assert_close(first, second, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weights", ["SS", "TS", "UU", "MM", "US"])
def test_csd_is_invariant_to_per_token_logit_shifts(weights):
    student, teacher = _logits()
    cfg = LossConfig("csd", weights=weights, temperature=1.3)
    loss, grad = _loss_and_grad(student, teacher, cfg)
    shift_s = torch.randn(student.shape[0], 1) * 50
    shift_t = torch.randn(student.shape[0], 1) * 50
    shifted_loss, shifted_grad = _loss_and_grad(student + shift_s, teacher + shift_t, cfg)
    torch.testing.assert_close(shifted_loss, loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shifted_grad, grad, rtol=1e-4, atol=1e-5)


def test_csd_is_zero_exactly_when_logits_differ_by_a_per_token_constant():
    student, _ = _logits()
    teacher = student - 7.0
    loss, grad = _loss_and_grad(student, teacher, LossConfig("csd", weights="MM"))
    assert loss.abs().max() < 1e-5 and grad.abs().max() < 1e-6
    loss, _ = _loss_and_grad(student, teacher, LossConfig("dld"))
    torch.testing.assert_close(loss, torch.full_like(loss, 0.5 * 49.0))  # dld is not shift invariant


# CSD's S and M weights are stop-gradient constants by definition, so a finite-difference check of
# the loss would differentiate through them; those pairs are checked against autograd of the dense
# double sum with detached weights instead (test_reference_parity.py).
_GRADCHECK_CONFIGS = [c for c in ALL_CONFIGS
                      if c.objective not in ("tvd",) and not (c.objective == "csd" and set(c.weights) & set("SM"))]


@pytest.mark.parametrize("cfg", _GRADCHECK_CONFIGS, ids=config_id)
def test_gradcheck_fp64(cfg):
    gen = torch.Generator().manual_seed(7)
    student = (torch.randn(3, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(3, 9, generator=gen, dtype=torch.float64) * 2
    teacher[1, 2] = float("-inf")
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, teacher, cfg, vocab_size=8), (student,))


def test_tvd_gradcheck_away_from_kinks():
    gen = torch.Generator().manual_seed(8)
    student = torch.randn(2, 7, generator=gen, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: distillation_loss(x, teacher, LossConfig("tvd")), (student,))


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=config_id)
def test_inputs_are_not_modified_and_teacher_gets_no_gradient(cfg, kernels):
    student, teacher = _logits()
    student_copy, teacher_copy = student.clone(), teacher.clone()
    leaf = student.requires_grad_(True)
    teacher_leaf = teacher.requires_grad_(True)
    distillation_loss(leaf, teacher_leaf, cfg).sum().backward()
    assert torch.equal(student.detach(), student_copy) and torch.equal(teacher.detach(), teacher_copy)
    assert teacher_leaf.grad is None


def test_all_masked_positions_give_zero_loss_and_gradient(kernels):
    student, teacher = _logits(rows=3)
    teacher[:] = float("-inf")
    loss, grad = _loss_and_grad(student, teacher, LossConfig("csd"))
    assert torch.equal(loss, torch.zeros(3)) and torch.equal(grad, torch.zeros_like(grad))
    for objective in ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "dld"):
        loss, grad = _loss_and_grad(student, teacher, LossConfig(objective))
        assert torch.equal(loss, torch.zeros(3)) and torch.equal(grad, torch.zeros_like(grad)), objective


def test_upstream_zero_gradient_gives_zero_gradient(kernels):
    student, teacher = _logits()
    leaf = student.requires_grad_(True)
    loss = distillation_loss(leaf, teacher, LossConfig("csd", weights="TS"))
    mask = torch.zeros_like(loss)
    mask[2] = 1.0
    (loss * mask).sum().backward()
    assert (leaf.grad[[0, 1, 3, 4, 5]] == 0).all() and leaf.grad[2].abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(objective="kl"), "objective"),
    (dict(weights="SX"), "weights"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(beta=0.0), "beta"),
    (dict(beta=1.0), "beta"),
    (dict(skew=1.5), "skew"),
    (dict(mix=-0.1), "mix"),
    (dict(scale=float("nan")), "scale"),
])
def test_config_rejects_bad_values_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    assert LossConfig.from_dict({"objective": "rkl", "weights": "ts"}).weights == "TS"
    with pytest.raises(ValueError, match="unknown loss config key.*temprature.*allowed"):
        LossConfig.from_dict({"temprature": 2.0})


def test_bad_inputs_raise_value_errors():
    student, teacher = _logits()
    cfg = LossConfig()
    with pytest.raises(ValueError, match="differ in shape"):
        distillation_loss(student, teacher[:, :-1], cfg)
    with pytest.raises(ValueError, match="bfloat16"):
        distillation_loss(student, teacher.bfloat16(), cfg)
    with pytest.raises(ValueError, match="floating-point"):
        distillation_loss(student.long(), teacher.long(), cfg)
    with pytest.raises(ValueError, match="vocab_size=51 is larger than the sharded logit width 50"):
        distillation_loss(student, teacher, cfg, vocab_size=51)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        distillation_loss(student, teacher, cfg, vocab_size=0)
    with pytest.raises(TypeError, match="LossConfig"):
        distillation_loss(student, teacher, {"objective": "csd"})
    with pytest.raises(ValueError, match="not initialised"):
        distillation_loss(student, teacher, cfg, tp_group=object())


@pytest.mark.parametrize("cfg", [LossConfig("csd", weights="SS"), LossConfig("csd", weights="TS"),
                                 LossConfig("csd", weights="UU"), LossConfig("csd", weights="MM"), LossConfig("fkl"),
                                 LossConfig("rkl"), LossConfig("jsd"), LossConfig("tvd"), LossConfig("skl"),
                                 LossConfig("srkl"), LossConfig("dld")], ids=config_id)
def test_second_backward_with_retained_graph_gives_the_same_gradient(cfg, kernels):
    student, teacher = _logits()
    leaf = student.requires_grad_(True)
    loss = distillation_loss(leaf, teacher, cfg).sum()
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(second, first, rtol=1e-6, atol=1e-7)
