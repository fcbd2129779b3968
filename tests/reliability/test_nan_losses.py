"""NaN is never reported as 0: invalid logits give a NaN loss and a NaN gradient for that token.

Every objective and CSD weight pair (tests/losses/cases.py), NaN and +inf in the student or the
teacher, at TP 1 and at TP 2 (gloo) with the bad value on one rank's shard only. -inf keeps
meaning "masked column" (rows with -inf columns and all -inf rows behave as before), and the
other tokens of the batch are unaffected: they equal a run without the bad token.
"""
import pytest
import torch
import torch.distributed as dist

from megatron_csd.losses import LossConfig, distillation_loss

from ..losses.cases import ALL_CONFIGS, config_id
from ..conftest import use_kernels
from ..spawn import run_distributed

BAD_VALUES = (float("nan"), float("inf"))
# One config per objective and CSD weight pair (the TP = 2 sweep; TP = 1 runs ALL_CONFIGS).
EACH_OBJECTIVE = list({(cfg.objective, cfg.weights if cfg.objective == "csd" else ""): cfg
                       for cfg in reversed(ALL_CONFIGS)}.values())
_BAD_ROW = 1


def _logits(vocab, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(5, vocab, generator=gen) * 3).to(dtype)
    teacher = (torch.randn(5, vocab, generator=gen) * 3).to(dtype)
    student[2, 1] = float("-inf")          # a masked column
    teacher[3, :] = float("-inf")          # a token with no usable column: loss 0
    upstream = torch.rand(5, generator=gen)
    upstream[_BAD_ROW] = 0.0                # NaN must survive a zero upstream gradient too
    return student, teacher, upstream


def _corrupt(student, teacher, which, value, column):
    student, teacher = student.clone(), teacher.clone()
    (student if which == "student" else teacher)[_BAD_ROW, column] = value
    return student, teacher


def _check(loss, grad, clean_loss, clean_grad, name):
    assert torch.isnan(loss[_BAD_ROW]), f"{name}: loss {loss[_BAD_ROW].item()} for an invalid token"
    assert torch.isnan(grad[_BAD_ROW]).all(), f"{name}: finite gradient for an invalid token"
    good = [row for row in range(loss.shape[0]) if row != _BAD_ROW]
    torch.testing.assert_close(loss[good], clean_loss[good], msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(grad[good], clean_grad[good], msg=lambda m: f"{name}: {m}")
    assert loss[3] == 0 and torch.all(grad[3] == 0), f"{name}: all-masked token changed"


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "posinf"])
def test_nan_or_posinf_input_gives_nan_loss_and_gradient_tp1(which, value, kernels):
    for index, cfg in enumerate(ALL_CONFIGS):
        student, teacher, upstream = _logits(13, seed=index)
        clean = student.clone().requires_grad_(True)
        clean_loss = distillation_loss(clean, teacher, cfg)
        (clean_loss * upstream).sum().backward()
        bad_student, bad_teacher = _corrupt(student, teacher, which, value, column=4)
        leaf = bad_student.requires_grad_(True)
        loss = distillation_loss(leaf, bad_teacher, cfg)
        (loss * upstream).sum().backward()
        _check(loss.detach(), leaf.grad, clean_loss.detach(), clean.grad, f"{config_id(cfg)} {which}={value}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_nan_input_gives_nan_loss_in_other_dtypes(dtype, kernels):
    for cfg in (LossConfig("csd", weights="SS"), LossConfig("csd", weights="UU"), LossConfig("fkl"),
                LossConfig("dld")):
        student, teacher, _ = _logits(13, seed=0, dtype=dtype)
        bad_student, bad_teacher = _corrupt(student, teacher, "student", float("nan"), column=0)
        leaf = bad_student.requires_grad_(True)
        loss = distillation_loss(leaf, bad_teacher, cfg)
        loss.sum().backward()
        assert torch.isnan(loss[_BAD_ROW]) and torch.isnan(leaf.grad[_BAD_ROW]).all(), config_id(cfg)
        assert torch.isfinite(loss[[0, 2, 3, 4]]).all(), config_id(cfg)


@pytest.mark.parametrize("cfg", [LossConfig("csd", weights="SS"), LossConfig("csd", weights="TT"),
                                 LossConfig("rkl"), LossConfig("dld")], ids=config_id)
def test_nan_facing_a_masked_column_is_still_invalid(cfg, kernels):
    """A NaN in a column the other input masks with -inf is still a broken input, not a mask."""
    student, teacher, _ = _logits(13, seed=3)
    student[_BAD_ROW, 6] = float("-inf")
    teacher[_BAD_ROW, 6] = float("nan")
    loss = distillation_loss(student, teacher, cfg)
    assert torch.isnan(loss[_BAD_ROW]) and torch.isfinite(loss[[0, 2, 3, 4]]).all()


def _sharded_invalid_token(rank, world_size, kernels):
    use_kernels(kernels)
    group = dist.new_group(list(range(world_size)))
    for bad_rank in range(world_size):
        _sharded_checks(rank, group, bad_rank)


def _sharded_checks(rank, group, bad_rank):
    local_width, vocab_size = 7, 13  # rank 1 holds one padded column
    columns = slice(rank * local_width, (rank + 1) * local_width)
    for index, cfg in enumerate(EACH_OBJECTIVE):
        student, teacher, upstream = _logits(2 * local_width, seed=index)
        clean = student[:, columns].clone().requires_grad_(True)
        clean_loss = distillation_loss(clean, teacher[:, columns].clone(), cfg, tp_group=group,
                                       vocab_size=vocab_size)
        (clean_loss * upstream).sum().backward()
        for which in ("student", "teacher"):
            for value in BAD_VALUES:
                bad_student, bad_teacher = _corrupt(student, teacher, which, value,
                                                    column=bad_rank * local_width + 2)
                leaf = bad_student[:, columns].clone().requires_grad_(True)
                loss = distillation_loss(leaf, bad_teacher[:, columns].clone(), cfg, tp_group=group,
                                         vocab_size=vocab_size)
                (loss * upstream).sum().backward()
                name = f"{config_id(cfg)} {which}={value} on rank {bad_rank}, seen by rank {rank}"
                _check(loss.detach(), leaf.grad[:, :vocab_size - rank * local_width], clean_loss.detach(),
                       clean.grad[:, :vocab_size - rank * local_width], name)


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["chunked", "compiled"])
def test_nan_or_posinf_on_one_shard_gives_nan_on_every_rank_tp2(kernels):
    """The bad value sits on rank 0's shard, then on rank 1's; both ranks must see NaN."""
    assert len(EACH_OBJECTIVE) == 17  # 10 CSD weight pairs, 6 KL-family objectives, dld
    run_distributed(_sharded_invalid_token, 2, kernels)


def test_padded_columns_of_an_invalid_token_get_zero_gradient_in_every_backward(kernels):
    """Padding is not vocabulary: its gradient is 0 on every row, also on a NaN row, and a second
    backward (retain_graph) gives the first one's NaN pattern (dld used to differ there)."""
    for index, cfg in enumerate(EACH_OBJECTIVE):
        student, teacher, _ = _logits(13, seed=index)
        bad_student, bad_teacher = _corrupt(student, teacher, "student", float("nan"), column=4)
        leaf = bad_student.requires_grad_(True)
        loss = distillation_loss(leaf, bad_teacher, cfg, vocab_size=10).sum()
        (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
        (second,) = torch.autograd.grad(loss, leaf)
        assert first[_BAD_ROW, :10].isnan().all() and (first[:, 10:] == 0).all(), config_id(cfg)
        assert torch.equal(first.isnan(), second.isnan()), config_id(cfg)
