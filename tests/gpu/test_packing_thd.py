"""Packed rows on the transformer-engine spec (THD + cu_seqlens), on a GPU (skipped elsewhere).

Written without GPU access: this is the check that makes the THD path verified. A bf16 tiny
Gemma on the TE spec: each sample's logits inside a packed row (THD params) must match the
sample run alone, unpacked (TE's causal mask, positions 0..n-1), to bf16 tolerance; changing
sample 0's tokens must leave sample 1's logits unchanged.
"""
import tempfile

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packing_thd_matches_unpacked_and_isolates_samples():
    from megatron_csd.models import transformer_engine_available

    if not transformer_engine_available():
        pytest.skip("needs transformer-engine")
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_csd.models import build_gpt_model, get_preset
    from megatron_csd.models.packed_attention import enable_packing, thd_packed_seq_params
    from megatron_csd.parallel.cpu_mode import seed_model_parallel_rng

    created = not dist.is_initialized()
    if created:
        torch.cuda.set_device(0)
        store = dist.FileStore(f"{tempfile.mkdtemp()}/store", 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    try:
        seed_model_parallel_rng(0)
        cfg = get_preset("tiny-gemma").replace(hidden_size=128, ffn_hidden_size=256,
                                               num_attention_heads=4, kv_channels=32)
        model = build_gpt_model(cfg, use_te=True, params_dtype=torch.bfloat16).cuda().eval()
        assert enable_packing(model, micro_batch_size=1) == "thd"
        lengths, s = [16, 24, 8], 64
        gen = torch.Generator().manual_seed(0)
        samples = [torch.randint(3, cfg.vocab_size, (n,), generator=gen) for n in lengths]
        tokens = torch.zeros(1, s, dtype=torch.long)
        positions = torch.zeros(1, s, dtype=torch.long)
        segments = torch.full((1, s), -1, dtype=torch.long)
        offset = 0
        for k, ids in enumerate(samples):
            tokens[0, offset:offset + len(ids)] = ids
            positions[0, offset:offset + len(ids)] = torch.arange(len(ids))
            segments[0, offset:offset + len(ids)] = k
            offset += len(ids)
        positions[0, offset:] = torch.arange(s - offset)
        tokens, positions, segments = tokens.cuda(), positions.cuda(), segments.cuda()

        def packed(tok):
            with torch.no_grad():
                return model(tok, positions, None, packed_seq_params=thd_packed_seq_params(segments))[0].float()

        logits = packed(tokens)
        offset = 0
        for ids in samples:
            alone_tokens = torch.zeros(1, s, dtype=torch.long, device="cuda")
            alone_tokens[0, :len(ids)] = ids.cuda()
            with torch.no_grad():
                alone = model(alone_tokens, torch.arange(s, device="cuda")[None], None)[0].float()
            torch.testing.assert_close(logits[offset:offset + len(ids)], alone[:len(ids)],
                                       rtol=2e-2, atol=2e-2)
            offset += len(ids)
        changed = tokens.clone()
        changed[segments == 0] = (changed[segments == 0] + 5) % cfg.vocab_size
        other = packed(changed)
        one = (segments[0] == 1)
        torch.testing.assert_close(other[one], logits[one], rtol=1e-3, atol=1e-3)
        assert not torch.allclose(other[segments[0] == 0], logits[segments[0] == 0])
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
