"""Deterministic, resumable, data-parallel sampling and micro-batch iteration."""
import json

import numpy as np
import pytest
import torch

from megatron_csd.data.dataset import InstructionDataset
from megatron_csd.data.prepare import prepare_dataset
from megatron_csd.data.sampler import BatchIterator, ResumableSampler, eval_batches, num_eval_batches
from megatron_csd.data.tokenizer import load_tokenizer
from megatron_csd.data.tokenizer_training import train_sentencepiece
from megatron_csd.data.toy import generate_records


def _draw(sampler, count):
    return sampler.next_indices(count)


def test_same_seed_same_order_and_each_epoch_is_a_permutation():
    a, b = ResumableSampler(13, seed=7), ResumableSampler(13, seed=7)
    stream = _draw(a, 39)
    assert stream == _draw(b, 39)
    for epoch in range(3):
        assert sorted(stream[13 * epoch:13 * (epoch + 1)]) == list(range(13))
    assert stream[:13] != stream[13:26]  # reshuffled every epoch
    assert stream[:13] != _draw(ResumableSampler(13, seed=8), 13)
    assert _draw(ResumableSampler(5, seed=7, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]
    assert a.state_dict() == {"epoch": 3, "index": 0, "seed": 7, "num_samples": 13, "shuffle": True}


@pytest.mark.parametrize("dp_size", [2, 3, 4])
def test_dp_ranks_split_the_global_stream_without_loss_or_duplicates(dp_size):
    num_samples, rounds = 10, 12  # 10 is not a multiple of 3 or 4
    global_stream = _draw(ResumableSampler(num_samples, seed=1), rounds * dp_size)
    per_rank = [_draw(ResumableSampler(num_samples, seed=1, dp_rank=r, dp_size=dp_size), rounds)
                for r in range(dp_size)]
    interleaved = [per_rank[r][k] for k in range(rounds) for r in range(dp_size)]
    assert interleaved == global_stream
    # every epoch's samples are spread over the ranks exactly once
    positions = [(k * dp_size + r, idx) for r in range(dp_size) for k, idx in enumerate(per_rank[r])]
    for epoch in range(len(global_stream) // num_samples):
        in_epoch = [idx for pos, idx in positions if pos // num_samples == epoch]
        assert sorted(in_epoch) == list(range(num_samples))


def test_resume_continues_exactly_also_under_another_dp_size():
    straight = ResumableSampler(11, seed=3)
    expected = _draw(straight, 40)
    first = ResumableSampler(11, seed=3)
    head = _draw(first, 16)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    assert state["epoch"] == 1 and state["index"] == 5
    resumed = ResumableSampler(11, seed=3)
    resumed.load_state_dict(state)
    assert head + _draw(resumed, 24) == expected
    ranks = [ResumableSampler(11, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    draws = [_draw(sampler, 12) for sampler in ranks]
    assert [draws[r][k] for k in range(12) for r in range(2)] == expected[16:]
    assert ranks[0].state_dict() == ranks[1].state_dict() == straight.state_dict()


def test_bad_sampler_arguments_and_mismatched_state():
    with pytest.raises(ValueError, match="dp_rank < dp_size"):
        ResumableSampler(10, seed=0, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        ResumableSampler(0, seed=0)
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match="checkpoint has seed=0 but this run has 1"):
        ResumableSampler(10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=10 but this run has 12"):
        ResumableSampler(12, seed=0).load_state_dict(state)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler_data")
    records = generate_records(23, seed=2)
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = load_tokenizer(train_sentencepiece([r["instruction"] + r["response"] for r in records],
                                                   root / "tokenizer.model", vocab_size=400))
    prepare_dataset(root / "d.jsonl", tokenizer, root / "prep", seq_length=48, template="gemma-chat")
    return InstructionDataset(root / "prep" / "train", 48)


def test_global_batches_hold_the_same_samples_for_dp_and_accumulation(dataset):
    """DP2 x micro 2 and DP1 x micro 2 x accumulation 2 see the same 4 samples per step."""
    single = BatchIterator(dataset, ResumableSampler(len(dataset), seed=9), micro_batch_size=2)
    dp = [BatchIterator(dataset, ResumableSampler(len(dataset), seed=9, dp_rank=r, dp_size=2), 2)
          for r in range(2)]
    for _ in range(15):  # crosses two epoch boundaries (23 samples)
        from_single = torch.cat([next(single)["tokens"], next(single)["tokens"]])
        from_dp = torch.cat([next(it)["tokens"] for it in dp])
        key = lambda rows: sorted(tuple(row.tolist()) for row in rows)
        assert key(from_single) == key(from_dp)
    batch = next(single)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "tokens": (2, 48), "labels": (2, 48), "loss_mask": (2, 48), "position_ids": (2, 48)}


def test_batch_iterator_resume_is_exact(dataset):
    straight = BatchIterator(dataset, ResumableSampler(len(dataset), seed=4), 3)
    expected = [next(straight) for _ in range(12)]
    first = BatchIterator(dataset, ResumableSampler(len(dataset), seed=4), 3)
    got = [next(first) for _ in range(5)]
    resumed = BatchIterator(dataset, ResumableSampler(len(dataset), seed=4), 3)
    resumed.load_state_dict(first.state_dict())
    got += [next(resumed) for _ in range(7)]
    for a, b in zip(got, expected):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="sampler covers 5 samples, dataset has 23"):
        BatchIterator(dataset, ResumableSampler(5, seed=0), 2)


@pytest.mark.parametrize("dp_size, micro_batch_size", [(1, 4), (2, 3), (3, 2), (4, 5)])
def test_eval_batches_cover_each_sample_once_with_equal_counts(dataset, dp_size, micro_batch_size):
    expected_batches = num_eval_batches(len(dataset), micro_batch_size, dp_size)
    seen = []
    total_mask = 0.0
    for rank in range(dp_size):
        batches = list(eval_batches(dataset, micro_batch_size, dp_rank=rank, dp_size=dp_size))
        assert len(batches) == expected_batches
        for batch in batches:
            assert batch["tokens"].shape == (micro_batch_size, 48)
            total_mask += float(batch["loss_mask"].sum())
            for row, mask in zip(batch["tokens"], batch["loss_mask"]):
                if mask.sum() > 0:
                    seen.append(tuple(row.tolist()))
                else:
                    assert (row == dataset.pad_id).all()  # filler
    assert sorted(seen) == sorted(tuple(dataset[i]["tokens"].tolist()) for i in range(len(dataset)))
    assert total_mask == sum(float(dataset[i]["loss_mask"].sum()) for i in range(len(dataset)))
