"""Replay buffer of generated samples (ImitKD, DistiLLM), identical on every rank.

Entries are ``(ids, prompt_length)`` -- prompt + generated response (+ eos), the form
``data.build_training_sample`` takes -- kept first-in first-out up to ``capacity`` (the oldest
is dropped, as in DistiLLM's ``deque(maxlen=capacity)``). Each step's generated samples are
all-gathered over the data-parallel group and pushed in global-sample order, so every rank
holds the same buffer whatever the TP/PP/DP layout; draws use keyed uniforms (on_policy.py),
so they are layout-independent too. The state (entries as base64 int32 strings) is small JSON
and travels in the trainer checkpoint with the data sampler's position.
"""
from __future__ import annotations

import base64
from collections import deque

import numpy as np
import torch.distributed as dist


class ReplayBuffer:
    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"replay buffer capacity must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.entries: deque = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.capacity

    def push(self, ids, prompt_length: int) -> None:
        self.entries.append(([int(t) for t in ids], int(prompt_length)))

    def draw(self, uniform: float) -> tuple:
        """The entry at ``floor(uniform * len)`` (``uniform`` in [0, 1))."""
        if not self.entries:
            raise RuntimeError("cannot draw from an empty replay buffer")
        return self.entries[min(int(uniform * len(self.entries)), len(self.entries) - 1)]

    def push_gathered(self, mine: list, dp_group, dp_size: int) -> None:
        """Push every DP rank's ``[(global_index, ids, prompt_length)]`` in global-index order."""
        parts = [mine]
        if dp_size > 1:
            parts = [None] * dp_size
            dist.all_gather_object(parts, mine, group=dp_group)
        for _, ids, prompt_length in sorted((e for part in parts for e in part), key=lambda e: e[0]):
            self.push(ids, prompt_length)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity,
                "entries": [[base64.b64encode(np.asarray(ids, dtype="<i4").tobytes()).decode("ascii"), p]
                            for ids, p in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the checkpoint's replay buffer holds up to {state['capacity']} samples, "
                             f"this run's --replay-buffer-size is {self.capacity}; use the same size to resume")
        self.entries.clear()
        for text, prompt_length in state["entries"]:
            self.push(np.frombuffer(base64.b64decode(text), dtype="<i4").tolist(), prompt_length)
