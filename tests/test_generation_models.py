"""Generation on converted tiny Gemma / LLaMA / GPT-2 models (fp32, gloo, 4 CPU processes):

- greedy, batched prompts of different lengths, at TP 1, TP 2, TP 4 and PP 2: token for token
  equal to transformers' generate(do_sample=False) on the same HF model, prompt by prompt;
- sampled tokens (temperature, top-k, top-p, per-request seeds) identical at every layout
  (TP 4: the LLaMA model only, to save time), and identical whether a request runs in a batch
  or alone; generation stops at eos (PP 2) without keeping it;
- the vocab-parallel sampler at TP 4 on random logits equals the one-rank sampler;
- the empirical distribution of 4000 sampled first tokens from the model at TP 2 fits
  softmax(logits / T) restricted by top-k / top-p of the HF model (chi-square).
All layouts run in one 4-process job (in a world of 4, TP1 / TP2 / PP2 have data-parallel
replicas: only replica 0 generates; every generating rank must agree).
"""
from pathlib import Path

import pytest
import torch

from tests.generation_models import PROMPTS, build_models, chi_square, hf_greedy, reference_probs
from tests.spawn import run_distributed

transformers = pytest.importorskip("transformers")

LAYOUTS = ((1, 1), (2, 1), (1, 2), (4, 1))
MAX_NEW = 12
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=MAX_NEW, eos_id=2)
CHI = dict(temperature=0.8, top_k=20, top_p=0.9)
CHI_SAMPLES = 4000
CHI_PROMPT = [1, 5, 9, 33, 7]


def _body(rank, world_size, root):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_csd.generation import GenerationRequest, SamplingParams, generate, load_for_generation
    from megatron_csd.generation.sampler import choose_tokens
    from megatron_csd.parallel.initialize import initialize_parallel

    root = Path(root)
    out = {}
    requests = [GenerationRequest(prompt, seed=100 + i) for i, prompt in enumerate(PROMPTS)]
    for tp, pp in LAYOUTS:
        initialize_parallel(device="cpu", tensor_model_parallel_size=tp,
                            pipeline_model_parallel_size=pp, seed=0)
        for name in ("gemma", "llama", "gpt2") if (tp, pp) != (4, 1) else ("llama",):
            model, cfg, _ = load_for_generation(str(root / f"mg_{name}"))  # collective: all ranks
            if parallel_state.get_data_parallel_rank() != 0:
                continue  # data-parallel replicas would only repeat the generation (CPU time)
            greedy = generate(model, requests, SamplingParams(greedy=True, max_new_tokens=MAX_NEW, eos_id=2),
                              vocab_size=cfg.vocab_size, max_batch_size=8)
            sampled = generate(model, requests, SamplingParams(**SAMPLING), vocab_size=cfg.vocab_size)
            out[f"{name}/tp{tp}pp{pp}/greedy"] = [(r.completion_ids, r.finish_reason) for r in greedy]
            out[f"{name}/tp{tp}pp{pp}/sampled"] = [r.completion_ids for r in sampled]
            if (tp, pp) == (1, 2):  # stop at an eos id that greedy decoding reaches at step 3
                eos = greedy[0].completion_ids[3]
                stopped = generate(model, requests, SamplingParams(greedy=True, max_new_tokens=MAX_NEW, eos_id=eos),
                                   vocab_size=cfg.vocab_size)
                out[f"{name}/eos"] = (eos, [(r.completion_ids, r.finish_reason) for r in stopped])
            if (tp, pp) == (1, 1):
                alone = [generate(model, [req], SamplingParams(**SAMPLING), vocab_size=cfg.vocab_size)[0]
                         for req in requests]
                out[f"{name}/alone/sampled"] = [r.completion_ids for r in alone]
            if (tp, pp) == (2, 1) and name == "llama":
                chi = generate(model, [GenerationRequest(CHI_PROMPT, seed=s) for s in range(CHI_SAMPLES)],
                               SamplingParams(max_new_tokens=1, **CHI), vocab_size=cfg.vocab_size,
                               max_batch_size=CHI_SAMPLES)
                out["chi_square_first_tokens"] = [r.completion_ids[0] for r in chi]
        if (tp, pp) == (4, 1):  # the sharded sampler equals the one-rank sampler on random logits
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            full = torch.randn(64, 320, generator=torch.Generator().manual_seed(5)) * 3
            for params in (SamplingParams(greedy=True), SamplingParams(temperature=0.7, top_k=30),
                           SamplingParams(temperature=1.2, top_p=0.6), SamplingParams(top_k=100, top_p=0.3)):
                kwargs = dict(limit=290, seeds=list(range(64)), steps=[3] * 64)
                sharded = choose_tokens(full[:, tp_rank * 80:(tp_rank + 1) * 80], params, vocab_start=tp_rank * 80,
                                        tp_group=parallel_state.get_tensor_model_parallel_group(), **kwargs)
                single = choose_tokens(full, params, vocab_start=0, tp_group=None, **kwargs)
                assert torch.equal(sharded, single), params
        parallel_state.destroy_model_parallel()
    gathered = [None] * world_size
    dist.all_gather_object(gathered, out)
    for other in gathered:  # every rank that generated in a layout got the same tokens
        assert all(other[key] == out[key] for key in set(other) & set(out)), "ranks disagree"
    if rank == 0:
        torch.save(out, root / "results.pt")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    models = build_models(root)
    run_distributed(_body, 4, str(root))
    return models, torch.load(root / "results.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "llama", "gpt2"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_greedy_matches_transformers_generate_at_tp_and_pp(generated, name, tp, pp):
    models, results = generated
    got = results[f"{name}/tp{tp}pp{pp}/greedy"]
    for prompt, (ids, reason) in zip(PROMPTS, got):
        assert ids == hf_greedy(models[name], prompt, MAX_NEW), prompt
        assert reason == ("length" if len(ids) == MAX_NEW else "eos")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "llama", "gpt2"])
def test_generation_stops_at_eos_without_keeping_it_at_pp2(generated, name):
    _, results = generated
    eos, stopped = results[f"{name}/eos"]
    for (full, _), (ids, reason) in zip(results[f"{name}/tp1pp1/greedy"], stopped):
        if eos in full:
            assert (ids, reason) == (full[:full.index(eos)], "eos")
        else:
            assert (ids, reason) == (full, "length")
    assert stopped[0][1] == "eos" and len(stopped[0][0]) <= 3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma", "llama", "gpt2"])
def test_sampled_tokens_identical_across_layouts_and_batching(generated, name):
    _, results = generated
    reference = results[f"{name}/tp1pp1/sampled"]
    assert all(len(ids) > 0 for ids in reference)
    for tp, pp in LAYOUTS[1:]:
        if (tp, pp) == (4, 1) and name != "llama":
            continue  # TP 4 runs one model (time)
        assert results[f"{name}/tp{tp}pp{pp}/sampled"] == reference, (tp, pp)
    assert results[f"{name}/alone/sampled"] == reference
    assert reference != [ids for ids, _ in results[f"{name}/tp1pp1/greedy"]]  # really sampled


@pytest.mark.slow
def test_model_first_tokens_follow_restricted_softmax(generated):
    models, results = generated
    with torch.no_grad():
        logits = models["llama"](torch.tensor([CHI_PROMPT])).logits[0, -1]
    expected = reference_probs(logits, CHI["temperature"], CHI["top_k"], CHI["top_p"])
    counts = torch.bincount(torch.tensor(results["chi_square_first_tokens"]), minlength=logits.numel()).double()
    assert float(counts[expected == 0].sum()) == 0
    stat, dof = chi_square(counts, expected, CHI_SAMPLES)
    assert dof >= 3 and stat < dof + 6 * (2 * dof) ** 0.5, (stat, dof)
