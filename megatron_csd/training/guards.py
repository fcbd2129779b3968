"""Run guards: a non-finite metric or weight stops the run; a diverging loss prints a warning.

``check_finite_metrics`` (every iteration and every validation) and ``check_finite_parameters``
(before every checkpoint save) raise ``NonFiniteMetricError`` naming the iteration and the
metric, on EVERY rank: each rank turns its own view into 0/1 flags and one MAX all-reduce over
the whole world makes them agree, so no rank is left waiting in a collective while another
stops. The flags are 0/1, never NaN (gloo's MAX may drop a NaN). Nothing is saved after a
failed check, so the last checkpoint on disk holds finite weights from a finite iteration.

Grad norm: the value Megatron's optimizer ``step()`` returns after the DP reduction, the
model-parallel all-reduce and clipping. It is ``None`` when Megatron did not measure it
(``clip_grad = 0``) or when fp16's loss scaler found inf/NaN and skipped the update (Megatron's
found-inf path, a normal event under dynamic loss scaling); only a measured norm is checked.
Megatron's ``check_for_nan_in_grad`` is not used: it raises on the one rank whose bucket holds
the NaN, before the DP collective, which leaves the other ranks hanging.

``DivergenceMonitor`` (logging rank): warns, without stopping, when an iteration's loss exceeds
``factor`` x the median of the previous ``window`` losses (after ``min_history`` of them).
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from megatron_csd.parallel.console import say

CHECKED_METRICS = ("loss", "ce", "kd", "teacher_ce", "grad_norm")


class NonFiniteMetricError(FloatingPointError):
    """A loss, CE, grad norm or weight became NaN / inf; the run stopped before saving."""


def _agree(flags: list, device) -> list:
    """Element-wise OR of 0/1 flags over every rank of the world (one MAX all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    tensor = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def _non_finite(value) -> bool:
    return value is not None and not math.isfinite(float(value))


def check_finite_metrics(record: dict, *, grad_norm_measured: bool = True,
                         device=torch.device("cpu")) -> None:
    """Raise NonFiniteMetricError on every rank if a metric of ``record`` is NaN/inf on any rank.

    ``record``: a train or valid metrics record (``iteration``, ``split`` and metric values).
    ``grad_norm_measured``: False when the optimizer returned no grad norm (see module doc).
    """
    local = [_non_finite(record.get(name)) if name != "grad_norm" or grad_norm_measured else False
             for name in CHECKED_METRICS]
    bad = [name for name, flag in zip(CHECKED_METRICS, _agree(local, device)) if flag]
    if not bad:
        return
    split = record.get("split", "train")
    values = ", ".join(f"{name} = {record.get(name)}" for name in bad)
    raise NonFiniteMetricError(
        f"non-finite {' and '.join(bad)} at iteration {record['iteration']} ({split}: {values}); "
        "the run stopped before saving, so the last checkpoint on disk is unchanged. The model "
        "diverged or the data/teacher produced NaN/inf: lower --lr, check --clip-grad, and "
        "resume from the last good checkpoint with --load")


def check_finite_parameters(model, iteration: int, *, device=torch.device("cpu")) -> None:
    """Raise NonFiniteMetricError on every rank if any rank holds a NaN/inf weight (pre-save)."""
    with torch.no_grad():  # one host sync for all parameters
        finite = [torch.isfinite(param).all() for param in model.parameters()]
        local = bool(finite) and not bool(torch.stack(finite).all())
    if _agree([local], device)[0]:
        raise NonFiniteMetricError(
            f"non-finite weights after iteration {iteration}: refusing to save checkpoint "
            f"{iteration}; the last checkpoint on disk is unchanged. Lower --lr (or check "
            "--clip-grad) and resume from the last good checkpoint with --load")


class DivergenceMonitor:
    """Warn when the loss exceeds ``factor`` x its running median; ``factor`` 0 turns it off."""

    def __init__(self, factor: float, *, enabled: bool = True, window: int = 100, min_history: int = 5):
        self.factor = float(factor)
        self.enabled = enabled and self.factor > 0
        self.min_history = min_history
        self.history: deque = deque(maxlen=window)

    def observe(self, iteration: int, loss: float) -> Optional[str]:
        """Record ``loss``; return (and print to stderr) the warning if it fires."""
        if not self.enabled or not math.isfinite(loss):
            return None
        message = None
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                message = (f"[megatron_csd] WARNING: loss {loss:.4g} at iteration {iteration} is "
                           f"{loss / median:.3g} x its running median {median:.4g} (threshold "
                           f"--divergence-warning-factor {self.factor:g}); the run may be diverging "
                           "(lower --lr?). Training continues.")
                say(message)
        self.history.append(loss)
        return message
