"""The ``on_policy`` section of the training config: where the training responses come from.

    student_data_ratio          GKD's lambda: per sample, the probability that its response is
                                replaced by one the current student samples from its prompt
                                (None = the on-policy machinery is off; 0 = on, never replaces)
    student_sample_temperature  sampling temperature of those student responses (top-k/top-p off)
    teacher_generated           SeqKD: every response is replaced by one the teacher generated
                                once, before training (``OUTPUT_DIR/teacher_generated.jsonl``)
    replay_buffer_size          > 0: student samples go through a replay buffer of this many
                                samples. Alone (ImitKD): a sample picked with probability
                                student_data_ratio is generated, pushed, and its slot is filled
                                by a uniform draw from the buffer
    adaptive_student_data       DistiLLM's adaptive off-policy schedule (needs the buffer):
                                student_data_ratio is the initial probability (default 0); it
                                grows by adaptive_ratio_step whenever the validation CE rises
                                by adaptive_loss_eps or more over the last reference value
    lm_data, lm_coef            optional pre-training term: + lm_coef * CE on plain text (lm_term.py)

All of them keep the objective, the CSD weighting and the per-token normalisation unchanged;
only the token sequences (and their loss masks) of the training batches change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def _flag(name: str, help_text: str) -> dict:
    return {"flag": name, "help": help_text}


def _number(name: str, value, *, low: float, high: Optional[float], low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"on_policy.{name} must be a number, got {type(value).__name__} ({value!r})")
    if value != value or (value <= low if low_open else value < low) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(f"on_policy.{name} must be in {bounds}, got {value}")


@dataclass
class OnPolicyConfig:
    student_data_ratio: Optional[float] = field(default=None, metadata=_flag(
        "--student-data-ratio", "GKD lambda: probability that a sample's response is sampled by the "
        "current student (unset = off)"))
    student_sample_temperature: float = field(default=1.0, metadata=_flag(
        "--student-sample-temperature", "temperature of the student's sampled responses"))
    teacher_generated: bool = field(default=False, metadata=_flag(
        "--teacher-generated", "SeqKD: train on responses the teacher generates once before training"))

    replay_buffer_size: int = field(default=0, metadata=_flag(
        "--replay-buffer-size", "replay buffer capacity in samples (ImitKD / DistiLLM; 0 = none)"))
    adaptive_student_data: bool = field(default=False, metadata=_flag(
        "--adaptive-student-data", "DistiLLM adaptive schedule of the student-sample probability"))
    adaptive_loss_eps: float = field(default=0.1, metadata=_flag(
        "--adaptive-loss-eps", "validation CE rise that raises the student-sample probability"))
    adaptive_ratio_step: float = field(default=0.1, metadata=_flag(
        "--adaptive-ratio-step", "how much the student-sample probability grows each time"))

    lm_data: Optional[str] = field(default=None, metadata=_flag(
        "--lm-data", "plain text (.txt, blank-line separated, or JSONL 'text') for a pre-training CE term"))
    lm_coef: Optional[float] = field(default=None, metadata=_flag(
        "--lm-coef", "weight C of the LM term: loss = distill + C * CE(text)"))

    def __post_init__(self):
        if (self.lm_data is None) != (self.lm_coef is None):
            raise ValueError("--lm-data and --lm-coef go together (the text and the weight of its CE term)")
        if self.lm_coef is not None:
            _number("lm_coef", self.lm_coef, low=0.0, high=None)
        if isinstance(self.replay_buffer_size, bool) or not isinstance(self.replay_buffer_size, int) \
                or self.replay_buffer_size < 0:
            raise ValueError(f"on_policy.replay_buffer_size must be an int >= 0, got {self.replay_buffer_size!r}")
        if not isinstance(self.adaptive_student_data, bool):
            raise TypeError(f"on_policy.adaptive_student_data must be true/false, got {self.adaptive_student_data!r}")
        _number("adaptive_loss_eps", self.adaptive_loss_eps, low=0.0, high=None)
        _number("adaptive_ratio_step", self.adaptive_ratio_step, low=0.0, high=1.0, low_open=True)
        if self.adaptive_student_data and self.replay_buffer_size == 0:
            raise ValueError("--adaptive-student-data (DistiLLM) reuses samples through a replay "
                             "buffer: set --replay-buffer-size (DistiLLM uses 1000)")
        if self.replay_buffer_size and self.student_data_ratio is None and not self.adaptive_student_data:
            raise ValueError("--replay-buffer-size needs --student-data-ratio (ImitKD: the "
                             "probability that a sample is drawn from the buffer; 1.0 in ImitKD)")
        if self.student_data_ratio is not None:
            _number("student_data_ratio", self.student_data_ratio, low=0.0, high=1.0)
        _number("student_sample_temperature", self.student_sample_temperature, low=0.0, high=None,
                low_open=True)
        if not isinstance(self.teacher_generated, bool):
            raise TypeError(f"on_policy.teacher_generated must be true/false, got {self.teacher_generated!r}")
        if self.teacher_generated and (self.student_data_ratio is not None or self.replay_buffer_size):
            raise ValueError("choose one response source: --teacher-generated (SeqKD) or "
                             "--student-data-ratio (GKD), not both")

    @property
    def enabled(self) -> bool:
        return (self.student_data_ratio is not None or self.teacher_generated
                or self.adaptive_student_data or self.lm_data is not None)

    def check_mode(self, mode: str) -> None:
        """On-policy regimes distil: they need the teacher (raises in SFT mode)."""
        if self.enabled and mode != "distill":
            raise ValueError("the on_policy options (--student-data-ratio, --teacher-generated, "
                             "--adaptive-student-data, --lm-data) need mode 'distill' with a teacher; "
                             "remove them for --mode sft")

    def check_packing(self, packing) -> None:
        """``--packing`` (explicit true) is refused with these options (``auto`` leaves it off)."""
        if packing is True and self.enabled:
            raise ValueError("--packing does not combine with the on-policy options yet (they replace "
                             "responses of single-sample rows): drop --packing or the on_policy options")
