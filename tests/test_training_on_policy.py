"""On-policy batches (megatron_csd.training.on_policy) without processes: masks, keyed decisions.

A scripted sampler stands in for generation here (it returns fixed completions per seed); the
trainer tests with real generation are in test_training_on_policy_layouts.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_csd.data import BatchIterator, ResumableSampler, build_training_sample
from megatron_csd.training.generated_samples import (Completion, generated_sample, keyed_seed,
                                                     keyed_uniform)
from megatron_csd.training.on_policy import OnPolicyBatches, build_on_policy
from megatron_csd.training.on_policy_config import OnPolicyConfig

PAD, EOS, BOS = 0, 1, 2
SEQ = 16


class _Dataset:
    """Prompts of 3..7 ids and responses of 2..5 ids; the InstructionDataset interface used."""

    pad_id = PAD

    def __init__(self, num: int = 40):
        rng = np.random.default_rng(0)
        self.items = []
        for _ in range(num):
            prompt = [BOS] + rng.integers(10, 90, size=int(rng.integers(2, 7))).tolist()
            response = rng.integers(10, 90, size=int(rng.integers(2, 6))).tolist() + [EOS]
            self.items.append((np.array(prompt), np.array(response)))

    def __len__(self):
        return len(self.items)

    def prompt_and_response(self, index):
        return self.items[index]

    def __getitem__(self, index):
        prompt, response = self.items[index]
        return build_training_sample(np.concatenate([prompt, response]), len(prompt), SEQ, PAD)


def _scripted_sampler(calls: list):
    """Completion of 0..max_new+2 ids from the seed alone; stops on eos when shorter than max."""

    def sample(model, prompts, seeds, *, temperature, max_new_tokens, eos_id):
        out = []
        for prompt, seed in zip(prompts, seeds):
            calls.append((tuple(int(t) for t in prompt), seed))
            rng = np.random.default_rng(seed)
            wanted = int(rng.integers(0, max_new_tokens + 3))
            out.append(Completion(rng.integers(100, 200, size=min(wanted, max_new_tokens)).tolist(),
                                  wanted < max_new_tokens))
        return out

    return sample


def _batches(ratio, *, dp_rank=0, dp_size=1, num_microbatches=4, micro_batch_size=2, calls=None,
             dataset=None):
    dataset = dataset or _Dataset()
    sampler = ResumableSampler(len(dataset), seed=5, dp_rank=dp_rank, dp_size=dp_size)
    return OnPolicyBatches(
        config=OnPolicyConfig(student_data_ratio=ratio), seed=9, dataset=dataset, sampler=sampler,
        micro_batch_size=micro_batch_size, num_microbatches=num_microbatches, dp_rank=dp_rank,
        dp_size=dp_size, seq_length=SEQ, student=torch.nn.Linear(1, 1), eos_id=EOS,
        sample_fn=_scripted_sampler([] if calls is None else calls), device=torch.device("cpu"))


@pytest.mark.parametrize("completion, stopped, budget, want_response", [
    ([30, 31, 32], True, 9, [30, 31, 32, EOS]),       # stopped on eos: the eos is a target too
    ([30, 31, 32], False, 3, [30, 31, 32]),            # length: no eos
    ([30, 31, 32, 33, 34], False, 3, [30, 31, 32]),    # generated past its budget: cut
    ([30, 31, 32], True, 3, [30, 31, 32]),             # eos came after the budget: cut, no eos
    ([], True, 9, [EOS]),                              # immediate eos
])
def test_generated_sample_loss_mask_covers_exactly_the_generated_tokens(completion, stopped, budget,
                                                                         want_response):
    prompt = [BOS, 40, 41, 42, 43]
    sample = generated_sample(prompt, Completion(completion, stopped), budget=budget, eos_id=EOS,
                              seq_length=SEQ, pad_id=PAD)
    ids = prompt + want_response
    mask = sample["loss_mask"].bool()
    # Independent statement of the rule: target t is ids[t + 1]; it is trained on iff it is a
    # generated token, i.e. len(prompt) <= t + 1 < len(ids).
    want_mask = torch.tensor([len(prompt) <= t + 1 < len(ids) for t in range(SEQ)])
    assert torch.equal(mask, want_mask)
    assert sample["labels"][mask].tolist() == want_response
    assert sample["tokens"][:len(ids)].tolist() == ids
    assert (sample["tokens"][len(ids):] == PAD).all()


def test_zero_ratio_gives_the_off_policy_batches_and_sampler_state():
    dataset = _Dataset()
    calls = []
    on_policy = _batches(0.0, dataset=dataset, calls=calls)
    plain = BatchIterator(dataset, ResumableSampler(len(dataset), seed=5), 2)
    for iteration in range(1, 8):  # 8 x 8 samples: crosses an epoch boundary
        for got in on_policy.step_iterator(iteration)[0]:
            want = next(plain)
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert on_policy.stats["generated_samples"] == 0
    assert calls == []
    state = on_policy.state_dict()
    assert {k: v for k, v in state.items() if k != "on_policy"} == plain.state_dict()


def _replaced_by_sample(batches: OnPolicyBatches, iteration: int, calls: list) -> dict:
    """{prompt: generated (tokens, mask)} for this rank's step, via the batches it yields."""
    calls.clear()
    out = {}
    for batch in batches.step_iterator(iteration)[0]:
        for row in range(batch["tokens"].shape[0]):
            out.setdefault("all", []).append((batch["tokens"][row].tolist(), batch["loss_mask"][row].tolist()))
    out["calls"] = sorted(calls)
    return out


def test_replacement_and_generation_seeds_do_not_depend_on_the_dp_layout():
    dataset = _Dataset()
    calls = []
    single = _batches(0.5, dataset=dataset, calls=calls)
    ranks = [_batches(0.5, dataset=dataset, dp_rank=r, dp_size=2, num_microbatches=2, calls=calls)
             for r in range(2)]
    total_generated = 0
    for iteration in range(1, 6):
        want = _replaced_by_sample(single, iteration, calls)
        got_calls, got_rows = [], []
        for rank in ranks:
            got = _replaced_by_sample(rank, iteration, calls)
            got_calls += got["calls"]
            got_rows += got["all"]
        assert sorted(got_calls) == want["calls"], iteration     # same prompts, same seeds
        assert sorted(got_rows) == sorted(want["all"]), iteration  # same samples in the step
        assert ranks[0].stats["generated_samples"] == single.stats["generated_samples"] == len(want["calls"])
        total_generated += len(want["calls"])
    assert 8 <= total_generated <= 32  # lambda = 0.5 of 40 samples


def test_student_samples_replace_responses_with_masks_on_generated_tokens_only():
    dataset = _Dataset()
    calls = []
    batches = _batches(1.0, dataset=dataset, calls=calls)
    rows = [(b["tokens"][r], b["labels"][r], b["loss_mask"][r]) for b in batches.step_iterator(1)[0]
            for r in range(b["tokens"].shape[0])]
    assert len(calls) == len(rows) == 8
    for (tokens, labels, mask), (prompt, seed) in zip(rows, calls):
        assert tokens[:len(prompt)].tolist() == list(prompt)
        positions = mask.nonzero().flatten()
        assert positions.numel() > 0 and positions[0] == len(prompt) - 1  # first target after the prompt
        generated = labels[positions]
        assert ((generated >= 100) & (generated < 200) | (generated == EOS)).all()
        assert (generated[:-1] != EOS).all()
        end = int(positions[-1]) + 2                                        # ids in the sample
        assert (tokens[end:] == PAD).all() and end <= SEQ + 1


def test_keyed_draws_are_uniform_and_independent_of_call_order():
    values = [keyed_uniform(3, it, g) for it in range(1, 21) for g in range(50)]
    assert 0.45 < float(np.mean(values)) < 0.55 and min(values) >= 0.0 and max(values) < 1.0
    assert keyed_uniform(3, 7, 11) == keyed_uniform(3, 7, 11) != keyed_uniform(3, 7, 12)
    assert keyed_seed(3, 7, 11) != keyed_seed(3, 8, 11)


def test_on_policy_config_rejects_bad_values():
    with pytest.raises(ValueError, match="student_data_ratio"):
        OnPolicyConfig(student_data_ratio=1.5)
    with pytest.raises(ValueError, match="temperature"):
        OnPolicyConfig(student_data_ratio=0.5, student_sample_temperature=0.0)
    with pytest.raises(ValueError, match="not both"):
        OnPolicyConfig(student_data_ratio=0.5, teacher_generated=True)


def _config_tree(**sections):
    from megatron_csd.training.config_io import config_from_dict

    tree = {"mode": "distill", "device": "cpu", "student": {"preset": "tiny-gemma"},
            "teacher": {"preset": "tiny-gemma"}, "data": {"train_path": "t", "tokenizer": "tok"}}
    tree.update(sections)
    return config_from_dict(tree)


def test_on_policy_flags_parse_and_are_refused_where_they_cannot_work():
    from types import SimpleNamespace

    from megatron_csd.training.config_io import parse_config

    config = parse_config(["--student-preset", "tiny-gemma", "--teacher-preset", "tiny-gemma",
                           "--train-data", "t", "--tokenizer", "tok", "--student-data-ratio", "0.5",
                           "--student-sample-temperature", "0.7", "--replay-buffer-size", "8",
                           "--adaptive-student-data", "--lm-data", "x.txt", "--lm-coef", "0.1"])
    assert (config.on_policy.student_data_ratio, config.on_policy.student_sample_temperature,
            config.on_policy.replay_buffer_size, config.on_policy.adaptive_student_data,
            config.on_policy.lm_data, config.on_policy.lm_coef) == (0.5, 0.7, 8, True, "x.txt", 0.1)
    with pytest.raises(ValueError, match="mode 'distill'"):
        _config_tree(mode="sft", teacher={}, on_policy={"student_data_ratio": 0.5})
    with pytest.raises(ValueError, match="lm-coef"):
        _config_tree(on_policy={"lm_data": "x.txt"})
    parallel = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    trainer = SimpleNamespace(config=_config_tree(parallel=parallel, on_policy={"student_data_ratio": 1.0}),
                              data=SimpleNamespace(valid=None))
    with pytest.raises(ValueError, match="sequence-parallel"):
        build_on_policy(trainer)
    trainer.config = _config_tree(on_policy={"adaptive_student_data": True, "replay_buffer_size": 4})
    with pytest.raises(ValueError, match="eval-interval"):
        build_on_policy(trainer)
