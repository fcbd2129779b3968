"""Packed sequences: several instruction samples per `seq_length` row, no compute on padding.

A sample with `n` stored ids occupies `n - 1` positions (input `ids[:-1]`, targets `ids[1:]`,
samples.py). Packing assigns every sample to one *bin* of `seq_length` positions:

  1. a seeded order `default_rng([seed, PACKING_STREAM]).permutation(n)` (so bins mix lengths
     and sources, independent of the per-epoch sample order);
  2. windows of `window` consecutive samples of that order; inside a window the samples are
     sorted by length, longest first (ties: earlier in the order first), and each goes to the
     open bin of the window with the LEAST room that still fits it (best-fit decreasing; ties:
     the oldest bin), else to a new bin. Bins close at the end of their window.

The result is a pure function of (sample lengths, seq_length, seed, window): every rank computes
the same bins without communication. Within a bin the samples keep their window order, each at
offset `o_k`; position t of the row holds

    tokens[t] = ids_k[t - o_k],  labels[t] = ids_k[t - o_k + 1],  position_ids[t] = t - o_k,
    loss_mask[t] = the sample's own loss_mask at t - o_k,  segment_ids[t] = k

and the tail after the last sample is padding (pad_id, loss_mask 0, segment_ids -1, positions
restarting at 0). `segment_ids` is what the model needs to isolate samples (a block-diagonal
causal mask, megatron_csd.models.packed_attention).

Why pack the dataset first and then sample bins (instead of packing each global batch): the
Megatron schedule needs the same, fixed number of microbatches on every DP rank. A bin dataset
keeps that, and the ResumableSampler over bins keeps its guarantees unchanged: a global batch
holds the same bins (hence samples) whatever DP size and accumulation, and the resume state is
the sampler's cursor. The cost: bins are fixed for the run (the bin order is reshuffled every
epoch, the bins' members are not), and `global_batch_size` counts packed rows (tokens per step
stay `global_batch_size * seq_length`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from megatron_csd.data.samples import build_training_sample

PACKING_STREAM = 0x9AC4  # separates the packing order's random stream from the epoch orders
DEFAULT_WINDOW = 1000


def pack_bins(lengths, capacity: int, *, seed: int, window: int = DEFAULT_WINDOW) -> list[list[int]]:
    """Bins (lists of sample indices) of total length <= capacity, by seeded windowed best-fit
    decreasing (module doc). Every index appears exactly once."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity < 1:
        raise ValueError(f"bin capacity must be >= 1, got {capacity}")
    if window < 1:
        raise ValueError(f"packing window must be >= 1, got {window}")
    if lengths.ndim != 1 or lengths.size == 0:
        raise ValueError("need a non-empty 1-d array of sample lengths")
    if lengths.min() < 1 or lengths.max() > capacity:
        raise ValueError(f"sample lengths must lie in [1, {capacity}], got [{lengths.min()}, "
                         f"{lengths.max()}]")
    order = np.random.default_rng([int(seed), PACKING_STREAM]).permutation(lengths.size)
    bins: list[list[int]] = []
    for start in range(0, order.size, window):
        chunk = order[start:start + window]
        rank_in_chunk = {int(index): r for r, index in enumerate(chunk)}
        # longest first; ties keep the order (stable sort on -length)
        by_length = chunk[np.argsort(-lengths[chunk], kind="stable")]
        rooms: list[tuple[int, int]] = []   # sorted (room left, bin id) of this window's bins
        members: list[list[int]] = []
        for index in by_length:
            size = int(lengths[index])
            slot = bisect.bisect_left(rooms, (size, -1))
            if slot == len(rooms):
                members.append([int(index)])
                bisect.insort(rooms, (capacity - size, len(members) - 1))
            else:
                room, bin_id = rooms.pop(slot)
                members[bin_id].append(int(index))
                bisect.insort(rooms, (room - size, bin_id))
        bins.extend(sorted(m, key=rank_in_chunk.__getitem__) for m in members)
    return bins


@dataclass(frozen=True)
class PaddingReport:
    """Share of row positions that hold no sample token, without and with packing."""

    num_samples: int
    num_bins: int
    padding_fraction_padded: float
    padding_fraction_packed: float

    def line(self) -> str:
        return (f"packing: {self.num_samples} samples in {self.num_bins} rows; padding "
                f"{100 * self.padding_fraction_padded:.1f}% of tokens unpacked -> "
                f"{100 * self.padding_fraction_packed:.1f}% packed")


class PackedDataset(torch.utils.data.Dataset):
    """Bins of an InstructionDataset as training rows (module doc); item = dict of [s] tensors
    with the keys of InstructionDataset plus `segment_ids`."""

    def __init__(self, dataset, *, seed: int, window: int = DEFAULT_WINDOW):
        self.dataset = dataset
        self.seq_length = dataset.seq_length
        self.pad_id = dataset.pad_id
        self.lengths = dataset.sample_num_ids() - 1
        self.bins = pack_bins(self.lengths, self.seq_length, seed=seed, window=window)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s = self.seq_length
        row = {"tokens": torch.full((s,), self.pad_id, dtype=torch.int64),
               "labels": torch.full((s,), self.pad_id, dtype=torch.int64),
               "loss_mask": torch.zeros(s, dtype=torch.float32),
               "position_ids": torch.zeros(s, dtype=torch.int64),
               "segment_ids": torch.full((s,), -1, dtype=torch.int64)}
        offset = 0
        for k, sample_index in enumerate(self.bins[int(index)]):
            n = int(self.lengths[sample_index])
            sample = self.dataset[sample_index]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                row[key][offset:offset + n] = sample[key][:n]
            row["segment_ids"][offset:offset + n] = k
            offset += n
        row["position_ids"][offset:] = torch.arange(s - offset)
        return row

    def masked_sample(self) -> dict[str, torch.Tensor]:
        sample = build_training_sample([self.pad_id], 1, self.seq_length, self.pad_id)
        sample["segment_ids"] = torch.full((self.seq_length,), -1, dtype=torch.int64)
        return sample

    def report(self) -> PaddingReport:
        used = float(self.lengths.sum())
        n = len(self.lengths)
        return PaddingReport(num_samples=n, num_bins=len(self.bins),
                             padding_fraction_padded=1.0 - used / (n * self.seq_length),
                             padding_fraction_packed=1.0 - used / (len(self.bins) * self.seq_length))
