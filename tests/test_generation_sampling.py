"""The layout-independent sampler on one rank: noise, masks, top-k / top-p against transformers'
warpers, and the chi-square test of sampled tokens against softmax(logits / T) restricted by
top-k / top-p (dense fp64 reference built with transformers' TopK/TopP warpers).

The multi-rank behaviour (same ids at TP 1, 2, 4 and PP 2) is in test_generation_models.py.
"""
import pytest
import torch

from megatron_csd.generation.noise import gumbel_noise, uniform_noise
from megatron_csd.generation.params import GenerationRequest, SamplingParams
from megatron_csd.generation.sampler import choose_tokens, top_p_mask
from tests.generation_models import chi_square as _chi_square, reference_probs as _reference_probs

transformers = pytest.importorskip("transformers")


def _choose(logits, params, *, seeds=None, steps=None, limit=None, start=0):
    rows = logits.shape[0]
    return choose_tokens(logits, params, vocab_start=start, limit=logits.shape[-1] if limit is None else limit,
                         seeds=seeds if seeds is not None else list(range(rows)),
                         steps=steps if steps is not None else [0] * rows, tp_group=None)


def test_noise_is_a_function_of_seed_step_and_global_id_only():
    ids = torch.arange(1000)
    full = uniform_noise([3, 3, 4], [0, 1, 0], ids)
    assert full.dtype == torch.float64 and 0 < float(full.min()) and float(full.max()) < 1
    shard = uniform_noise([3, 3, 4], [0, 1, 0], ids[500:750])  # what TP rank 2 of 4 computes
    assert torch.equal(shard, full[:, 500:750])
    assert not torch.equal(full[0], full[1]) and not torch.equal(full[0], full[2])
    assert torch.equal(uniform_noise([3], [0], ids), full[:1])
    # roughly uniform, independent of the id (a biased hash would show here)
    assert abs(float(full.mean()) - 0.5) < 0.02
    g = gumbel_noise([11], [5], torch.arange(200000))
    assert abs(float(g.mean()) - 0.5772) < 0.01 and abs(float(g.var()) - 1.6449) < 0.03


def test_greedy_is_argmax_over_the_real_vocabulary_with_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0, 9.0, 9.0], [5.0, 1.0, 5.0, 0.0, 0.0, 0.0]])
    params = SamplingParams(greedy=True)
    assert _choose(logits, params, limit=4).tolist() == [1, 0]  # ids 4, 5: Megatron padding
    assert _choose(logits, params).tolist() == [4, 0]
    shard = _choose(logits[:, 3:], params, start=3, limit=4)
    assert shard.tolist() == [3, 3]


def test_padded_and_undecodable_columns_are_never_sampled():
    torch.manual_seed(0)
    logits = torch.randn(64, 40)
    logits[:, 30:] = 50.0  # ids 30..39 would always win if sampled
    params = SamplingParams(temperature=2.0)
    ids = _choose(logits, params, limit=30)
    assert int(ids.max()) < 30 and len(set(ids.tolist())) > 5
    assert int(_choose(logits, SamplingParams(temperature=2.0, decodable_vocab_size=None)).min()) >= 30


def test_nan_logits_are_an_error():
    logits = torch.zeros(2, 8)
    logits[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        _choose(logits, SamplingParams())


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.9, 0.999])
def test_top_p_mask_is_exactly_transformers_nucleus(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    generator = torch.Generator().manual_seed(int(top_p * 1000))
    scores = torch.randn(16, 97, generator=generator, dtype=torch.float64) * 3
    scores[:, 90:] = float("-inf")  # masked columns stay out
    ours = top_p_mask(scores, top_p, None)
    ref = TopPLogitsWarper(top_p)(None, scores.clone())
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_sampling_params_reject_bad_values():
    for bad in (dict(temperature=0.0), dict(temperature=float("nan")), dict(top_k=-1),
                dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0), dict(eos_id=-2),
                dict(stop_strings="</s>"), dict(decodable_vocab_size=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError):
        GenerationRequest(prompt_ids=[])
    with pytest.raises(ValueError):
        GenerationRequest(prompt_ids=[1, -3])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.8),
                                                     (0.8, 16, 0.9)])
def test_sampled_tokens_follow_softmax_restricted_by_top_k_top_p(temperature, top_k, top_p):
    """Chi-square goodness of fit over 20000 seeds (deterministic: the seeds are fixed).

    Threshold: dof + 6 sqrt(2 dof) (a ~1e-6 tail under the null); the same statistic against
    the distribution at a 15% different temperature must exceed it (the test can fail).
    """
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(40, generator=generator) * 2
    samples = 20000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    ids = _choose(logits.expand(samples, -1).contiguous(), params, seeds=list(range(1000, 1000 + samples)))
    counts = torch.bincount(ids, minlength=40).double()
    expected = _reference_probs(logits, temperature, top_k, top_p)
    assert float(counts[expected == 0].sum()) == 0  # nothing outside the top-k / nucleus
    stat, dof = _chi_square(counts, expected, samples)
    threshold = dof + 6 * (2 * dof) ** 0.5
    assert stat < threshold, (stat, dof)
    wrong = _reference_probs(logits, temperature * 1.15, top_k, top_p)
    assert _chi_square(counts, wrong, samples)[0] > threshold
