"""DistillationStage bookkeeping around the teacher (no Megatron, toy modules).

- ``start_teacher_pass`` forwards ``set_is_first_microbatch`` to a teacher that has it and is
  harmless for one that does not;
- teacher timing on CUDA never synchronises per microbatch: it records a ``torch.cuda.Event``
  pair around each teacher forward and reads them only in ``teacher_forward_seconds``
  (checked here with fake events, since the test machine has no GPU); on CPU it is wall time.
"""
from __future__ import annotations

import pytest
import torch

from megatron_csd.training.stage import DistillationStage


class ToyModel(torch.nn.Module):
    def __init__(self, hidden: int, *, frozen: bool):
        super().__init__()
        self.proj = torch.nn.Linear(1, hidden)
        if frozen:
            self.proj.requires_grad_(False)
        self.forwards = 0

    def set_input_tensor(self, tensor):
        pass

    def forward(self, input_ids, position_ids, attention_mask=None):
        self.forwards += 1
        return self.proj(input_ids.float().unsqueeze(-1))


class MarkedTeacher(ToyModel):
    def __init__(self, hidden: int):
        super().__init__(hidden, frozen=True)
        self.marks = 0

    def set_is_first_microbatch(self):
        self.marks += 1


def _stage(teacher, *, timed=True):
    return DistillationStage(ToyModel(3, frozen=False), teacher, student_hidden=3, teacher_hidden=5,
                             post_process=True, timed=timed)


def test_start_teacher_pass_marks_the_first_microbatch_when_supported():
    teacher = MarkedTeacher(5)
    stage = _stage(teacher)
    stage.start_teacher_pass()
    assert teacher.marks == 1
    _stage(ToyModel(5, frozen=True)).start_teacher_pass()  # no such method: nothing happens
    DistillationStage(ToyModel(3, frozen=False), None, student_hidden=3, teacher_hidden=0,
                      post_process=True).start_teacher_pass()


class FakeEvent:
    """Stands in for torch.cuda.Event: a recorded 'time' in ms, no device work."""
    clock_ms = 0.0
    synchronized = 0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        FakeEvent.clock_ms += 10.0
        self.at = FakeEvent.clock_ms

    def synchronize(self):
        FakeEvent.synchronized += 1

    def elapsed_time(self, end):
        return end.at - self.at


def test_cuda_teacher_timing_uses_events_and_no_device_synchronize(monkeypatch):
    stage = _stage(ToyModel(5, frozen=True))
    monkeypatch.setattr(stage, "_teacher_on_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)

    def no_sync(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize() in the microbatch loop")

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
    ids = torch.arange(4).view(1, 4)
    for _ in range(3):  # three microbatches
        student_out, teacher_out = stage(ids, ids)
        assert teacher_out.shape[-1] == 5 and student_out.shape[-1] == 3
    assert FakeEvent.synchronized == 0  # nothing read yet
    assert stage.teacher_forward_seconds() == pytest.approx(3 * 0.010)  # 10 ms per pair
    stage.reset_teacher_time()
    assert stage.teacher_forward_seconds() == 0.0


def test_cpu_teacher_timing_is_wall_time_and_off_when_untimed():
    teacher = ToyModel(5, frozen=True)
    stage = _stage(teacher)
    ids = torch.arange(4).view(1, 4)
    stage(ids, ids)
    assert stage.teacher_forward_seconds() > 0 and teacher.forwards == 1
    untimed = _stage(ToyModel(5, frozen=True), timed=False)
    untimed(ids, ids)
    assert untimed.teacher_forward_seconds() == 0.0
