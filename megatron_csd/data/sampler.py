"""Deterministic, resumable, data-parallel sample order; micro-batch iterators over a dataset.

Order: the samples of epoch e are `permutation_e = default_rng([seed, e]).permutation(n)`
(identity without shuffling); the epochs are concatenated into one endless global stream.
A shared cursor walks the stream; each draw hands global position `cursor + dp_rank` to rank
`dp_rank` and then advances the cursor by `dp_size`. Hence

  * within an epoch every sample goes to exactly one rank, once (nothing dropped or repeated,
    also when dp_size does not divide n: the last round simply reaches into the next epoch);
  * a global batch (micro_batch * num_microbatches * dp_size consecutive positions) holds the
    same samples for every dp_size, so DP layouts and gradient accumulation see the same data;
  * the state is the cursor, identical on every rank, stored as (epoch, index) with index =
    cursor - epoch * n; it restores exactly, also under a different dp_size.

No communication: every rank computes the same permutation from the seed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from megatron_csd.data.dataset import InstructionDataset, collate


class ResumableSampler:
    def __init__(self, num_samples: int, *, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.shuffle = shuffle
        self._cursor = 0
        self._cached_epoch = -1
        self._cached_order: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        return self._cursor // self.num_samples

    @property
    def consumed_samples(self) -> int:
        """Global positions consumed so far by all ranks together."""
        return self._cursor

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global sample order of `epoch` (the same on every rank)."""
        if epoch != self._cached_epoch:
            if self.shuffle:
                self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                self._cached_order = np.arange(self.num_samples)
            self._cached_epoch = epoch
        assert self._cached_order is not None
        return self._cached_order

    def next_indices(self, count: int) -> list[int]:
        """This rank's next `count` sample indices (every rank must call this in lockstep)."""
        indices = []
        for _ in range(count):
            position = self._cursor + self.dp_rank
            epoch, index = divmod(position, self.num_samples)
            indices.append(int(self.epoch_order(epoch)[index]))
            self._cursor += self.dp_size
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self._cursor - self.epoch * self.num_samples,
                "seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume the data order: the checkpoint has {key}="
                                 f"{state[key]!r} but this run has {getattr(self, key)!r} "
                                 "(same data, data seed and packing setting, --packing / --no-packing, are "
                                 "needed for an exact resume)")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.num_samples:
            raise ValueError(f"bad sampler state epoch={epoch} index={index}")
        self._cursor = epoch * self.num_samples + index


class BatchIterator:
    """Endless micro-batches [micro_batch_size, s] for this rank; state is the sampler's."""

    def __init__(self, dataset: InstructionDataset, sampler: ResumableSampler, micro_batch_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if sampler.num_samples != len(dataset):
            raise ValueError(f"sampler covers {sampler.num_samples} samples, dataset has {len(dataset)}")
        self.dataset = dataset
        self.sampler = sampler
        self.micro_batch_size = micro_batch_size

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.dataset[i] for i in self.sampler.next_indices(self.micro_batch_size)])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def num_eval_batches(num_samples: int, micro_batch_size: int, dp_size: int) -> int:
    per_rank = -(-num_samples // dp_size)
    return -(-per_rank // micro_batch_size)


def eval_batches(dataset: InstructionDataset, micro_batch_size: int, *, dp_rank: int = 0,
                 dp_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the dataset, rank r taking samples r, r + dp_size, ... in file order.

    Every rank yields the same number of full micro-batches (`num_eval_batches`); empty slots
    are filled with all-masked padding samples, so summing loss over loss_mask across ranks
    covers each sample exactly once.
    """
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    indices = list(range(dp_rank, len(dataset), dp_size))
    total = num_eval_batches(len(dataset), micro_batch_size, dp_size) * micro_batch_size
    filler = dataset.masked_sample()
    for start in range(0, total, micro_batch_size):
        yield collate([dataset[indices[j]] if j < len(indices) else filler
                       for j in range(start, start + micro_batch_size)])
