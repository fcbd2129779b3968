"""Replay buffer, ImitKD and DistiLLM's adaptive schedule in the on-policy batches (no processes)."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_csd.data import ResumableSampler
from megatron_csd.training.on_policy import BUFFER, DATA, FRESH, OnPolicyBatches
from megatron_csd.training.on_policy_config import OnPolicyConfig
from megatron_csd.training.replay_buffer import ReplayBuffer
from tests.test_training_on_policy import EOS, SEQ, _Dataset, _scripted_sampler


def _batches(config: OnPolicyConfig, calls: list, *, train_iters: int = 10) -> OnPolicyBatches:
    dataset = _Dataset()
    return OnPolicyBatches(
        config=config, seed=9, dataset=dataset, sampler=ResumableSampler(len(dataset), seed=5),
        micro_batch_size=2, num_microbatches=4, dp_rank=0, dp_size=1, seq_length=SEQ,
        student=torch.nn.Linear(1, 1), eos_id=EOS, sample_fn=_scripted_sampler(calls),
        device=torch.device("cpu"), train_iters=train_iters)


def _rows(batches: OnPolicyBatches, iteration: int) -> list:
    return [(b["tokens"][r].tolist(), b["loss_mask"][r].tolist())
            for b in batches.step_iterator(iteration)[0] for r in range(b["tokens"].shape[0])]


def test_replay_buffer_is_fifo_and_its_state_round_trips_through_json():
    buffer = ReplayBuffer(3)
    for n in range(5):
        buffer.push([2, 10 + n, 2**31 - 1 - n], 1)
    assert [ids[1] for ids, _ in buffer.entries] == [12, 13, 14] and buffer.full
    assert buffer.draw(0.0)[0][1] == 12 and buffer.draw(0.999)[0][1] == 14
    restored = ReplayBuffer(3)
    restored.load_state_dict(json.loads(json.dumps(buffer.state_dict())))
    assert list(restored.entries) == list(buffer.entries)
    with pytest.raises(ValueError, match="replay-buffer-size"):
        ReplayBuffer(4).load_state_dict(buffer.state_dict())


def test_imitkd_pushes_every_student_sample_and_trains_on_buffer_draws():
    calls = []
    batches = _batches(OnPolicyConfig(student_data_ratio=1.0, replay_buffer_size=5), calls)
    for iteration in (1, 2):
        calls.clear()
        rows = [(b["tokens"][r].tolist(), b["labels"][r].tolist(), b["loss_mask"][r].tolist())
                for b in batches.step_iterator(iteration)[0] for r in range(b["tokens"].shape[0])]
        assert len(calls) == 8                                    # the whole batch was generated
        assert len(batches.buffer) == 5                           # the newest 5 of them are kept
        in_buffer = {tuple(ids) for ids, _ in batches.buffer.entries}
        for tokens, labels, mask in rows:                         # every row is a buffer entry
            last = max(t for t, m in enumerate(mask) if m)        # last target position
            assert tuple(tokens[:last + 1] + [labels[last]]) in in_buffer
        assert batches.stats["replayed_samples"] == 8 and batches.stats["generated_samples"] == 8


def test_distillm_schedule_sources_and_ratio_growth():
    config = OnPolicyConfig(student_data_ratio=0.0, replay_buffer_size=4, adaptive_student_data=True,
                            adaptive_loss_eps=0.1, adaptive_ratio_step=0.25)
    batches = _batches(config, [], train_iters=4)
    assert {batches.source(1, g, 0) for g in range(64)} == {DATA}
    for ce, want in ((3.0, 0.0), (2.5, 0.0), (3.05, 0.0), (3.1, 0.25), (3.15, 0.25), (3.3, 0.5)):
        batches.observe_validation({"ce": ce})
        assert batches.ratio == want
    batches.ratio = 1.0
    # buffer not full: every picked sample is generated fresh; full: fresh with probability
    # ratio (1 - iteration / train_iters), otherwise drawn from the buffer
    assert {batches.source(2, g, 3) for g in range(64)} == {FRESH}
    late = [batches.source(3, g, 4) for g in range(400)]
    assert set(late) == {FRESH, BUFFER} and 50 < late.count(FRESH) < 150   # 1/4 of 400
    assert {batches.source(4, g, 4) for g in range(64)} == {BUFFER}


def test_on_policy_state_restores_the_buffer_ratio_and_data_position_exactly():
    config = OnPolicyConfig(student_data_ratio=0.5, replay_buffer_size=6, adaptive_student_data=True,
                            adaptive_loss_eps=0.0)
    straight = _batches(config, [], train_iters=6)
    for iteration in (1, 2, 3):
        _rows(straight, iteration)
        straight.observe_validation({"ce": 1.0 + iteration})
    state = json.loads(json.dumps(straight.state_dict()))        # as trainer_state.json holds it
    resumed = _batches(config, [], train_iters=6)
    resumed.load_state_dict(state)
    assert resumed.ratio == straight.ratio > 0.5
    for iteration in (4, 5, 6):
        assert _rows(resumed, iteration) == _rows(straight, iteration)
        assert resumed.stats == {**straight.stats, "generate_s": resumed.stats["generate_s"]}
    assert straight.stats["replayed_samples"] > 0


def test_replay_options_are_checked():
    with pytest.raises(ValueError, match="replay-buffer-size"):
        OnPolicyConfig(adaptive_student_data=True)
    with pytest.raises(ValueError, match="student-data-ratio"):
        OnPolicyConfig(replay_buffer_size=8)
    with pytest.raises(ValueError, match="not both"):
        OnPolicyConfig(teacher_generated=True, student_data_ratio=1.0, replay_buffer_size=8)
