"""Generated training samples: keyed draws, the sampler interface, prompt + completion -> sample.

``keyed_uniform`` / ``keyed_seed`` are counter-based draws (``numpy.random.default_rng`` seeded
with the key), so they carry no state and do not depend on the TP/PP/DP layout or call order.
A :data:`Sampler` is collective over the model's TP x PP group; :func:`megatron_sampler` is the
project's Megatron-Core generation (megatron_csd.generation) behind that interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

_TAG_REPLACE, _TAG_SEED, _TAG_BUFFER = 0, 1, 2


def keyed_uniform(seed: int, iteration: int, index: int, tag: int = _TAG_REPLACE) -> float:
    """A uniform in [0, 1) that depends only on (seed, iteration, index, tag)."""
    return float(np.random.default_rng([seed, iteration, index, tag]).random())


def keyed_seed(seed: int, iteration: int, index: int) -> int:
    """The generation seed of sample ``index`` of step ``iteration`` (layout-independent)."""
    return int(np.random.default_rng([seed, iteration, index, _TAG_SEED]).integers(0, 2**31 - 1))


@dataclass(frozen=True)
class Completion:
    """What a sampler returns per prompt: generated ids without the stopping eos."""

    ids: list
    stopped_on_eos: bool


# sampler(model, prompts, seeds, *, temperature, max_new_tokens, eos_id) -> list[Completion];
# collective over the model's TP x PP group (identical arguments on those ranks).
Sampler = Callable[..., list]


def megatron_sampler(*, vocab_size: int, decodable_vocab_size: Optional[int] = None) -> Sampler:
    """The project's Megatron-Core generation (megatron_csd.generation) as a :data:`Sampler`.

    ``vocab_size``: the model's rows (Megatron padding beyond is never sampled);
    ``decodable_vocab_size``: the tokenizer's size -- model rows past it are never sampled
    either, as at inference, so every generated id is a token the tokenizer knows.
    """

    def sample(model, prompts, seeds, *, temperature, max_new_tokens, eos_id):
        from megatron_csd.generation import GenerationRequest, SamplingParams, generate

        params = SamplingParams(greedy=False, temperature=float(temperature), top_k=0, top_p=1.0,
                                max_new_tokens=int(max_new_tokens), eos_id=eos_id,
                                decodable_vocab_size=decodable_vocab_size)
        requests = [GenerationRequest(prompt_ids=[int(t) for t in p], seed=int(s))
                    for p, s in zip(prompts, seeds)]
        results = generate(model, requests, params, vocab_size=vocab_size)
        return [Completion(list(r.completion_ids), r.finish_reason == "eos") for r in results]

    return sample


def generated_ids(prompt_ids: Sequence[int], completion: Completion, *, budget: int,
                  eos_id: Optional[int]) -> list:
    """``prompt + completion[:budget] (+ eos if it stopped within the budget)``."""
    ids = [int(t) for t in completion.ids[:budget]]
    if completion.stopped_on_eos and eos_id is not None and len(completion.ids) < budget:
        ids.append(int(eos_id))
    return [int(t) for t in prompt_ids] + ids


def generated_sample(prompt_ids: Sequence[int], completion: Completion, *, budget: int,
                     eos_id: Optional[int], seq_length: int, pad_id: int) -> dict:
    """Training sample of :func:`generated_ids`; loss mask = exactly the generated targets."""
    from megatron_csd.data import build_training_sample

    ids = generated_ids(prompt_ids, completion, budget=budget, eos_id=eos_id)
    return build_training_sample(ids, len(prompt_ids), seq_length, pad_id)


def sample_with(sampler: Sampler, model, prompts: list, seeds: list, *, temperature: float,
                budgets: list, eos_id: Optional[int]) -> list:
    """Run ``sampler`` once for all prompts (max new tokens = the largest budget), model in eval
    mode under ``no_grad``; its train/eval mode is restored. Each completion is later cut to its
    own budget, which equals generating with that budget: the token at step k depends only on
    the request's seed, k and the prefix."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            completions = sampler(model, prompts, seeds, temperature=temperature,
                                  max_new_tokens=max(budgets), eos_id=eos_id)
    finally:
        model.train(was_training)
    if len(completions) != len(prompts):
        raise RuntimeError(f"the sampler returned {len(completions)} completions for {len(prompts)} prompts")
    return completions
