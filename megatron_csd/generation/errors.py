"""``GenerationError``: the model's logits cannot be sampled (NaN / +inf, or every id masked).

Raised on EVERY rank of the model-parallel group at the same step: the last pipeline stage
encodes the condition per row as a negative sentinel id (``NAN_LOGITS``, ``NOTHING_SAMPLABLE``)
in the ids it broadcasts anyway (one collective per step), and every stage decodes it after
the broadcast (engine.py). Within TP, the condition travels as 0/1 flags in the sampler's MAX
all-reduce, never as a NaN value (gloo's MAX may drop a NaN), so every TP rank agrees.
"""
from __future__ import annotations

from typing import Sequence

NAN_LOGITS = -1         # the row's logits hold NaN (or +inf) on some TP shard
NOTHING_SAMPLABLE = -2  # every vocabulary id of the row is masked (-inf)


class GenerationError(FloatingPointError):
    """Generation cannot continue: the model's logits are NaN or leave no token to sample."""


def check_chosen(chosen: Sequence[int], *, first_request: int = 0, steps: Sequence[int] = ()) -> None:
    """Raise GenerationError if a row of `chosen` holds a sentinel id (first bad row named).

    chosen: the ids of one step, one per row; row r is request ``first_request + r`` and has
    generated ``steps[r]`` tokens so far (the step named in the message).
    """
    for row, token in enumerate(chosen):
        if token >= 0:
            continue
        step = f" at step {steps[row]}" if row < len(steps) else ""
        where = f"request {first_request + row}{step}"
        if token == NAN_LOGITS:
            raise GenerationError(f"{where}: the model's logits are NaN: the checkpoint is damaged "
                                  "or diverged (check it, e.g. resume from an earlier checkpoint)")
        if token == NOTHING_SAMPLABLE:
            raise GenerationError(f"{where}: no token can be sampled: every vocabulary id has logit "
                                  "-inf (the checkpoint is damaged or diverged)")
        raise GenerationError(f"{where}: invalid token id {token}")
