"""Sharded (TP = 2, 4; gloo processes) equals unsharded: loss, each rank's gradient slice, collectives."""
import pytest
import torch
import torch.distributed as dist

from megatron_csd.losses import LossConfig, distillation_loss

from ..conftest import use_kernels
from ..spawn import run_distributed
from .cases import ALL_CONFIGS, config_id
from .dense_reference import dense_loss_and_grad


def _full_logits(vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(4, 3, vocab, generator=gen) * 3
    teacher = torch.randn(4, 3, vocab, generator=gen) * 3
    student[0, 1, 2] = float("-inf")
    teacher[1, 0, vocab // 2] = float("-inf")
    teacher[2, 2, :] = float("-inf")  # a token with no usable column
    upstream = torch.rand(4, 3, generator=gen)
    return student, teacher, upstream


class _CollectiveCounter:
    """Counts torch.distributed.all_reduce calls by reduce op while active."""

    def __init__(self):
        self.calls = []
        self._original = dist.all_reduce

    def __enter__(self):
        def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            self.calls.append(("MAX" if op == dist.ReduceOp.MAX else "SUM" if op == dist.ReduceOp.SUM else str(op),
                               tuple(tensor.shape)))
            return self._original(tensor, op=op, group=group, async_op=async_op)
        dist.all_reduce = counting_all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._original


def _sharded_matches_unsharded(rank, world_size, local_width, vocab_size, kernels):
    use_kernels(kernels)
    group = dist.new_group(list(range(world_size)))
    full_width = local_width * world_size
    columns = slice(rank * local_width, (rank + 1) * local_width)
    for index, cfg in enumerate(ALL_CONFIGS):
        student, teacher, upstream = _full_logits(full_width, seed=index)
        # Unsharded run of the same function, and the dense fp64 reference.
        reference_loss, reference_grad = dense_loss_and_grad(student, teacher, cfg, vocab_size, upstream)
        leaf = student[..., columns].clone().requires_grad_(True)
        with _CollectiveCounter() as counter:
            loss = distillation_loss(leaf, teacher[..., columns].clone(), cfg, tp_group=group, vocab_size=vocab_size)
        with _CollectiveCounter() as backward_counter:
            (loss * upstream).sum().backward()
        name = config_id(cfg)
        torch.testing.assert_close(loss.double(), reference_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(leaf.grad.double(), reference_grad[..., columns], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} rank {rank}: {m}")
        unsharded = distillation_loss(student, teacher, cfg, vocab_size=vocab_size)
        torch.testing.assert_close(loss, unsharded, rtol=1e-5, atol=1e-6)
        assert backward_counter.calls == [], f"{name}: backward communicated {backward_counter.calls}"
        ops = [op for op, _ in counter.calls]
        if cfg.objective == "csd":
            assert ops == ["MAX", "SUM"], f"{name}: expected one MAX and one SUM all-reduce, saw {counter.calls}"
            num_bases = len({b for f in cfg.weights for b in (("S", "T") if f == "M" else (f,))})
            assert counter.calls[0][1] == (12, 2), counter.calls  # [tokens, (max zs, max zt)]
            assert counter.calls[1][1] == (world_size, 12, 3 * num_bases), counter.calls
        elif cfg.objective == "dld":
            assert ops == ["SUM"], f"{name}: {counter.calls}"
        else:
            assert ops == ["MAX", "SUM", "SUM"], f"{name}: {counter.calls}"
        # Communication volume does not depend on the vocabulary size.
        assert all(12 in shape for _, shape in counter.calls)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, local_width, vocab_size, kernels", [
    (2, 20, 37, "chunked"),   # rank 1 holds 17 real columns and 3 padded ones
    (4, 10, 25, "chunked"),   # rank 2 is partly padded, rank 3 holds padding only
    (2, 20, 37, "compiled"),  # the fused compiled CPU kernels, every objective
])
def test_sharded_loss_and_gradients_equal_unsharded(world_size, local_width, vocab_size, kernels):
    run_distributed(_sharded_matches_unsharded, world_size, local_width, vocab_size, kernels)
