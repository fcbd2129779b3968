"""The KV cache is really used: a decode step at position ~100 costs within 1.5x of one at ~10.

Timed with forward hooks on the GPTModel inside one generate() call (batch 8, hidden 256), as
the median over positions 6..14 and 96..104, over 3 runs (median of the ratios, robust to a
loaded machine). The same model re-running the whole prefix instead (no cache) is > 1.5x slower
at ~100 than at ~10, so the bound does tell a cached loop from an uncached one.
"""
import statistics
import time

import pytest
import torch

from tests.spawn import run_distributed

NEAR, FAR = range(6, 15), range(96, 105)


def _body(rank, world_size, result_file):
    from megatron_csd.generation import GenerationRequest, SamplingParams, generate
    from megatron_csd.models import ModelConfig, build_gpt_model
    from megatron_csd.parallel.initialize import initialize_parallel

    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
    cfg = ModelConfig(family="llama", num_layers=2, hidden_size=256, ffn_hidden_size=512,
                      num_attention_heads=4, vocab_size=512, max_position_embeddings=160)
    model = build_gpt_model(cfg).eval()
    steps = []

    def before(module, args, kwargs):
        steps.append([int(args[1][0, -1]), args[0].shape[1], time.perf_counter()])

    def after(module, args, kwargs, output):
        steps[-1][2] = time.perf_counter() - steps[-1][2]

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)
    requests = [GenerationRequest([1, 2 + i, 3, 4], seed=i) for i in range(8)]
    ratios = []
    for _ in range(3):
        steps.clear()
        results = generate(model, requests, SamplingParams(max_new_tokens=110), vocab_size=cfg.vocab_size)
        assert all(len(r.completion_ids) == 110 for r in results)
        decode = {position: seconds for position, width, seconds in steps if width == 1}
        ratios.append(statistics.median(decode[p] for p in FAR) / statistics.median(decode[p] for p in NEAR))
    uncached = []
    with torch.no_grad():
        for length in (10, 100, 10, 100, 10, 100):
            tokens = torch.randint(0, 512, (8, length))
            positions = torch.arange(length).expand(8, length)
            start = time.perf_counter()
            model(tokens, positions, None)
            uncached.append(time.perf_counter() - start)
    uncached_ratio = statistics.median(uncached[1::2]) / statistics.median(uncached[0::2])
    torch.save(dict(ratio=statistics.median(ratios), ratios=ratios, uncached_ratio=uncached_ratio), result_file)


@pytest.mark.slow
def test_kv_cache_decode_time_is_flat_in_position(tmp_path):
    run_distributed(_body, 1, str(tmp_path / "timing.pt"))
    timing = torch.load(tmp_path / "timing.pt")
    print(timing)
    assert timing["uncached_ratio"] > 1.5, timing  # the bound can tell cached from uncached
    assert timing["ratio"] < 1.5, timing
