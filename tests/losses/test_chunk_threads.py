"""Chunk loops on CPU worker threads (row_ops.for_each_chunk) give exactly the serial results."""
import threading

import pytest
import torch

from megatron_csd.losses import LossConfig, distillation_loss, row_ops

from .cases import ALL_CONFIGS, config_id


def _loss_and_grad(cfg, student, teacher):
    leaf = student.clone().requires_grad_(True)
    loss = distillation_loss(leaf, teacher, cfg, vocab_size=student.shape[-1] - 3)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).view_as(loss))
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=config_id)
def test_worker_threads_match_the_serial_loop_bitwise(cfg, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(37, 96, generator=gen) * 3
    teacher = torch.randn(37, 96, generator=gen) * 3
    student[5, 7] = teacher[9, 2] = float("-inf")  # masked rows take the redo path inside a worker
    monkeypatch.setattr(row_ops, "CHUNK_ELEMENTS", 4 * 96)  # 10 chunks
    monkeypatch.setattr(row_ops, "LOSS_THREADS", 1)
    serial = _loss_and_grad(cfg, student, teacher)
    monkeypatch.setattr(row_ops, "LOSS_THREADS", 3)
    threads_before = torch.get_num_threads()
    threaded = _loss_and_grad(cfg, student, teacher)
    assert torch.get_num_threads() == threads_before
    seen_by_a_new_thread = []
    thread = threading.Thread(target=lambda: seen_by_a_new_thread.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen_by_a_new_thread == [threads_before]
    assert torch.equal(serial[0], threaded[0]) and torch.equal(serial[1], threaded[1])


def test_an_error_inside_a_worker_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(row_ops, "LOSS_THREADS", 2)
    threads_before = torch.get_num_threads()

    def body(start, end, workspace):
        if start >= 4:
            raise ValueError(f"chunk {start}")

    with pytest.raises(ValueError, match="chunk"):
        row_ops.for_each_chunk(64, row_ops.CHUNK_ELEMENTS // 4, body, torch.float32, torch.device("cpu"))
    assert torch.get_num_threads() == threads_before


def test_worker_threads_run_every_chunk_once_without_autograd(monkeypatch):
    monkeypatch.setattr(row_ops, "LOSS_THREADS", 2)
    seen, modes = [], set()

    def body(start, end, workspace):
        seen.append((start, end))
        modes.add(torch.is_grad_enabled())

    row_ops.for_each_chunk(50, row_ops.CHUNK_ELEMENTS // 4, body, torch.float32, torch.device("cpu"))
    assert sorted(seen) == [(s, min(s + 4, 50)) for s in range(0, 50, 4)]
    assert modes == {False}


def test_worker_threads_under_inference_mode_and_nested_calls(monkeypatch):
    monkeypatch.setattr(row_ops, "LOSS_THREADS", 2)
    monkeypatch.setattr(row_ops, "CHUNK_ELEMENTS", 4 * 64)
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(24, 64, generator=gen), torch.randn(24, 64, generator=gen)
    expected = distillation_loss(student, teacher, LossConfig("fkl"))
    with torch.inference_mode():
        assert torch.equal(distillation_loss(student, teacher, LossConfig("fkl")), expected)
    seen = []

    def inner(start, end, workspace):
        seen.append(start)

    def outer(start, end, workspace):  # a nested loop runs serially inside the worker
        row_ops.for_each_chunk(8, row_ops.CHUNK_ELEMENTS // 4, inner, torch.float32, torch.device("cpu"))

    row_ops.for_each_chunk(16, row_ops.CHUNK_ELEMENTS // 4, outer, torch.float32, torch.device("cpu"))
    assert sorted(seen) == sorted([0, 4] * 4)
