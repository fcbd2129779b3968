"""One pipeline stage of the trained model: the student's layers, plus the frozen teacher's.

Teacher and student are split over the same pipeline stages (the pattern of ModelOpt /
Megatron-Bridge). Between stages the two hidden states travel as ONE p2p tensor,
``[s, b, h_student + h_teacher]`` (concatenated on the hidden dim, ``pipeline_dtype``):

- ``set_input_tensor`` (called by the schedule with the received tensor) splits it again; the
  teacher half is detached, so the gradient sent back upstream is ``[grad_student | 0]``;
- ``forward`` runs the teacher under ``no_grad`` then the student; a middle stage returns the
  concatenation, the last stage returns ``(student_logits, teacher_logits)`` (both
  ``[b, s, V_padded / TP]``, vocab-parallel) for the loss function; with
  ``fused_output_loss`` it returns ``(placeholder, FusedHeads)``: the models' final hidden
  states and output weights, for the fused output-layer loss (training/fused_loss.py).

The teacher is held outside the module tree (``_frozen`` list), so ``parameters()``,
``state_dict()``, Megatron DDP and the optimizer see the student only; the teacher has no
gradient buffers and no optimizer state. Megatron's schedule and ``finalize_model_grads``
reach the student through ``.module`` (``get_attr_wrapped_model``). In SFT mode the teacher is
absent and the stage is a thin pass-through.

Teacher timing (``timed=True``) measures the teacher forward of THIS stage only (this rank's
teacher layers), summed over the microbatches since :meth:`reset_teacher_time`. It never
synchronises the GPU: on CUDA each forward is bracketed by a pair of ``torch.cuda.Event``
records and the pairs are read once, by :meth:`teacher_forward_seconds` (after the step's own
synchronise); on CPU it is wall time.
"""
from __future__ import annotations

import contextlib

import time
from typing import Optional

import torch


class DistillationStage(torch.nn.Module):
    """Student GPTModel (``self.module``) with an optional frozen teacher on the same stage."""

    def __init__(self, student: torch.nn.Module, teacher: Optional[torch.nn.Module], *,
                 student_hidden: int, teacher_hidden: int, post_process: bool, timed: bool = False,
                 fused_output_loss: bool = False):
        super().__init__()
        self.module = student  # the name Megatron's get_attr_wrapped_model unwraps through
        self._frozen = [teacher] if teacher is not None else []
        self.student_hidden = student_hidden
        self.teacher_hidden = teacher_hidden if teacher is not None else 0
        self.post_process = post_process
        self.timed = timed
        self._teacher_wall_seconds = 0.0
        self._teacher_events: list = []  # (start, end) torch.cuda.Event pairs, read lazily
        if teacher is not None:
            if any(p.requires_grad for p in teacher.parameters()):
                raise ValueError("the teacher must be frozen (freeze_teacher) before it joins a stage")
            teacher.eval()
        # Fused output layer + loss (training/fused_loss.py): the last stage returns the models'
        # final hidden states and output weights (FusedHeads) instead of their logits.
        self._captures = None
        if fused_output_loss and post_process:
            from megatron_csd.models.output_capture import OutputCapture

            self._captures = [OutputCapture(student)] + ([OutputCapture(teacher)] if teacher is not None else [])

    @property
    def fused(self) -> bool:
        return self._captures is not None

    def _fused_output(self, student_out):
        from megatron_csd.training.fused_objective import FusedHeads

        heads = [capture.take() for capture in self._captures]
        return student_out, FusedHeads(heads[0], heads[1] if len(heads) > 1 else None)

    @property
    def teacher(self) -> Optional[torch.nn.Module]:
        return self._frozen[0] if self._frozen else None

    def start_teacher_pass(self) -> None:
        """Call once before each forward-backward pass (a training step or an evaluation).

        Tells the teacher's Transformer-Engine layers that the next microbatch is the first of
        the pass (``set_is_first_microbatch``), so an FP8 teacher casts its frozen weights to
        FP8 once per pass and reuses the cast for the other microbatches. Megatron's schedule
        only makes this call on the DDP-wrapped student. A no-op for the local (non-TE) spec,
        where GPTModel's method returns without effect, and without a teacher.
        """
        teacher = self.teacher
        if teacher is not None and hasattr(teacher, "set_is_first_microbatch"):
            teacher.set_is_first_microbatch()

    def _teacher_on_cuda(self) -> bool:
        return any(p.is_cuda for p in self.teacher.parameters())

    def reset_teacher_time(self) -> None:
        self._teacher_wall_seconds = 0.0
        self._teacher_events = []

    def teacher_forward_seconds(self) -> float:
        """Teacher forward time of this stage since the last reset (reads pending CUDA events)."""
        seconds = self._teacher_wall_seconds
        for start, end in self._teacher_events:
            end.synchronize()  # already complete after the step's synchronise: no extra wait
            seconds += start.elapsed_time(end) / 1000.0
        return seconds

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # dropout etc. stay off in the teacher, always
        return self

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor
        if self.teacher is None or tensor is None:
            self.module.set_input_tensor(tensor)
            if self.teacher is not None:
                self.teacher.set_input_tensor(None)
            return
        if tensor.shape[-1] != self.student_hidden + self.teacher_hidden:
            raise RuntimeError(f"received hidden width {tensor.shape[-1]}, expected student "
                               f"{self.student_hidden} + teacher {self.teacher_hidden}")
        student_in, teacher_in = torch.split(tensor, [self.student_hidden, self.teacher_hidden], dim=-1)
        self.module.set_input_tensor(student_in)
        self.teacher.set_input_tensor(teacher_in.detach())

    def forward(self, input_ids, position_ids, attention_mask=None, capture_heads: bool = True,
                packed_seq_params=None):
        """Last stage: logits, or with the fused loss (and ``capture_heads``) FusedHeads.

        Packed rows: student and teacher get the same ``attention_mask`` / THD
        ``packed_seq_params`` (megatron_csd.models.packed_attention)."""
        extra = {} if packed_seq_params is None else {"packed_seq_params": packed_seq_params}
        if not self.fused:
            return self._forward(input_ids, position_ids, attention_mask, extra, fused=False)
        with contextlib.ExitStack() as stack:
            for capture in self._captures:
                stack.enter_context(capture.active(capture_heads))
            return self._forward(input_ids, position_ids, attention_mask, extra, fused=capture_heads)

    def _forward(self, input_ids, position_ids, attention_mask, extra, *, fused: bool):
        if self.teacher is None:
            student_out = self.module(input_ids, position_ids, attention_mask, **extra)
            return self._fused_output(student_out) if fused else student_out
        on_cuda = self.timed and self._teacher_on_cuda()
        if on_cuda:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        start = time.perf_counter()
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, position_ids, attention_mask, **extra)
        if on_cuda:
            events[1].record()
            self._teacher_events.append(events)
        elif self.timed:
            self._teacher_wall_seconds += time.perf_counter() - start
        student_out = self.module(input_ids, position_ids, attention_mask, **extra)
        if self.post_process:
            return self._fused_output(student_out) if fused else (student_out, teacher_out)
        return torch.cat([student_out, teacher_out.to(student_out.dtype)], dim=-1)

    def sharded_state_dict(self, *args, **kwargs):
        return self.module.sharded_state_dict(*args, **kwargs)


def widen_p2p_shapes(extra_hidden: int):
    """``adjust_tensor_shapes_fn`` for the 1F1B schedule: p2p tensors carry both hidden states."""
    def adjust(recv_shapes, send_shapes):
        def widen(shapes):
            return [tuple(shape[:-1]) + (shape[-1] + extra_hidden,) for shape in shapes]
        return widen(recv_shapes), widen(send_shapes)
    return adjust


def fused_head_supported(student, teacher) -> bool:
    """Whether the fused output-layer loss can take these models' heads (warns when not).

    True on stages without an output layer (only the last stage uses the switch)."""
    import warnings

    from megatron_csd.models.output_capture import fused_head_problem

    for role, model in (("student", student), ("teacher", teacher)):
        if model is None or getattr(model, "output_layer", None) is None:
            continue
        problem = fused_head_problem(model)
        if problem is not None:
            warnings.warn(f"fused output-layer loss off for this run: the {role}'s {problem}")
            return False
    return True
