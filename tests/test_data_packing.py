"""Bin packing (megatron_csd.data.packing): capacity, coverage, determinism, row layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_csd.data import (BatchIterator, PackedDataset, ResumableSampler, collate, pack_bins,
                               prepare_dataset, InstructionDataset, load_tokenizer)
from megatron_csd.data.toy import build_toy_data


def test_packing_bins_cover_every_sample_once_within_capacity():
    lengths = np.random.default_rng(0).integers(1, 65, size=500)
    bins = pack_bins(lengths, 64, seed=3, window=50)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(lengths[b].sum() <= 64 for b in bins)
    # best-fit decreasing fills well: few bins beyond the lower bound
    assert len(bins) <= int(np.ceil(lengths.sum() / 64) * 1.1) + 10


def test_packing_is_deterministic_and_seeded():
    lengths = np.random.default_rng(1).integers(1, 30, size=200)
    assert pack_bins(lengths, 32, seed=5) == pack_bins(lengths, 32, seed=5)
    assert pack_bins(lengths, 32, seed=5) != pack_bins(lengths, 32, seed=6)


@pytest.mark.parametrize("lengths, capacity, match", [
    ([0, 3], 8, "lengths must lie"), ([9], 8, "lengths must lie"), ([], 8, "non-empty")])
def test_packing_rejects_bad_lengths(lengths, capacity, match):
    with pytest.raises(ValueError, match=match):
        pack_bins(lengths, capacity, seed=0)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing_data")
    paths = build_toy_data(root / "toy", num_train=40, num_valid=4, vocab_size=512)
    tokenizer = load_tokenizer(paths["tokenizer"])
    prepare_dataset(paths["train"], tokenizer, root / "prepared", seq_length=32, template="dolly")
    return root / "prepared" / "train"


def test_packing_rows_keep_each_sample_its_positions_and_loss_mask(prepared):
    dataset = InstructionDataset(prepared, 96)
    packed = PackedDataset(dataset, seed=11)
    assert len(packed) < len(dataset)
    seen = []
    for b in range(len(packed)):
        row = packed[b]
        offset = 0
        for k, index in enumerate(packed.bins[b]):
            n = int(dataset.sample_num_ids()[index]) - 1
            alone = dataset[index]
            part = slice(offset, offset + n)
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(row[key][part], alone[key][:n]), key
            assert alone["loss_mask"][n:].sum() == 0  # nothing of the sample's loss was cut
            assert (row["segment_ids"][part] == k).all()
            seen.append(index)
            offset += n
        assert (row["segment_ids"][offset:] == -1).all() and row["loss_mask"][offset:].sum() == 0
        assert torch.equal(row["position_ids"][offset:], torch.arange(96 - offset))
    assert sorted(seen) == list(range(len(dataset)))
    report = packed.report()
    assert report.padding_fraction_packed < report.padding_fraction_padded
    used = float((dataset.sample_num_ids() - 1).sum())
    assert report.padding_fraction_packed == pytest.approx(1 - used / (len(packed) * 96))


def test_packing_global_batch_holds_the_same_samples_for_every_dp_size(prepared):
    packed = PackedDataset(InstructionDataset(prepared, 96), seed=11)
    rows_per_step = 4

    def step_samples(dp_size):
        rows = []
        for rank in range(dp_size):
            it = BatchIterator(packed, ResumableSampler(len(packed), seed=2, dp_rank=rank, dp_size=dp_size),
                               rows_per_step // dp_size)
            rows.append(next(it)["tokens"])
        return sorted(map(tuple, torch.cat(rows).tolist()))

    assert step_samples(1) == step_samples(2) == step_samples(4)
    assert collate([packed[0], packed[1]])["segment_ids"].shape == (2, 96)
