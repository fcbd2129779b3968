"""ModelConfig / presets / build_gpt_model / freeze_teacher (megatron_csd.models).

HF parity of the built architectures (logits vs transformers) is checked in
tests/test_conversion.py, which fills these models from HF checkpoints.
"""
import json
import os
from unittest import mock

import pytest
import torch

from megatron_csd.models import PRESET_NAMES, ModelConfig, get_preset
from tests.spawn import run_distributed

REQUIRED_PRESETS = ("gemma-2b", "gemma-7b", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
                    "llama-7b", "openllama-3b", "openllama-7b", "tiny-gemma", "tiny-gemma-mha",
                    "tiny-llama", "tiny-gpt2")


def test_presets_cover_the_agreed_names_and_round_trip_through_json():
    assert set(REQUIRED_PRESETS) <= set(PRESET_NAMES)
    for name in PRESET_NAMES:
        cfg = get_preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.padded_vocab_size % 1024 == 0 and cfg.padded_vocab_size >= cfg.vocab_size
        if name.startswith("tiny"):
            assert cfg.num_layers == 2 and 32 <= cfg.hidden_size <= 64


def test_gemma_presets_match_the_published_architecture():
    small, large = get_preset("gemma-2b"), get_preset("gemma-7b")
    assert (small.num_query_groups, small.kv_channels, small.vocab_size) == (1, 256, 256000)
    assert large.num_attention_heads * large.kv_channels == 4096 != large.hidden_size
    for cfg in (small, large):
        assert cfg.tie_embeddings and cfg.zero_centered_norm and cfg.gated_mlp
        assert cfg.embedding_scale == pytest.approx(cfg.hidden_size ** 0.5)
    assert get_preset("gpt2").padded_vocab_size == 51200


@pytest.mark.parametrize("changes,error,match", [
    (dict(family="bert"), ValueError, "family"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(hidden_size=64.0), TypeError, "hidden_size"),
    (dict(num_query_groups=3), ValueError, "num_query_groups"),
    (dict(padded_vocab_size=100), ValueError, "padded_vocab_size"),
    (dict(norm_epsilon=0.0), ValueError, "norm_epsilon"),
    (dict(hidden_dropout=1.0), ValueError, "hidden_dropout"),
    (dict(tie_embeddings=1), TypeError, "tie_embeddings"),
])
def test_model_config_rejects_bad_values(changes, error, match):
    with pytest.raises(error, match=match):
        get_preset("tiny-llama").replace(**changes)


def test_model_config_needs_kv_channels_when_heads_do_not_divide_hidden():
    with pytest.raises(ValueError, match="kv_channels"):
        ModelConfig(family="llama", num_layers=1, hidden_size=60, ffn_hidden_size=8,
                    num_attention_heads=8, vocab_size=10, max_position_embeddings=8)


def test_model_config_from_dict_rejects_unknown_keys():
    data = get_preset("tiny-gpt2").to_dict()
    data["hidden_sise"] = 3
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict(data)


def test_replace_vocab_size_re_derives_padding():
    assert get_preset("tiny-gpt2").replace(vocab_size=2000).padded_vocab_size == 2048


def test_get_preset_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="tiny-gemma"):
        get_preset("gemma-3b")


def test_tensor_parallel_check_needs_tp_multiple_of_kv_groups_when_groups_are_fewer():
    from megatron.core.transformer import TransformerConfig

    from megatron_csd.models.builder import allowed_tensor_parallel_sizes, check_parallel_compatible

    # 12 heads, 3 KV groups: TP 4 passes every width check (QKV rows 144, FFN 192, vocab 3072)
    # but cannot replicate 3 KV heads evenly over 4 ranks.
    cfg = ModelConfig(family="llama", num_layers=2, hidden_size=96, ffn_hidden_size=192,
                      num_attention_heads=12, num_query_groups=3, vocab_size=300,
                      padded_vocab_size=3072, max_position_embeddings=64)
    assert allowed_tensor_parallel_sizes(cfg) == [1, 3, 6, 12]
    with pytest.raises(ValueError, match=r"size 4 must be a multiple of num_query_groups \(3\).*"
                       r"num_attention_heads=12, num_query_groups=3.*sizes for this model: "
                       r"\[1, 3, 6, 12\]"):
        check_parallel_compatible(cfg, 4, 1)
    with pytest.raises(ValueError, match=r"size 2 must divide num_query_groups \(3\)"):
        check_parallel_compatible(cfg, 2, 1)
    # Megatron-Core itself agrees on the refused and allowed sizes (its own config check).
    for tp in (1, 2, 3, 4, 6, 12):
        kwargs = dict(num_layers=2, hidden_size=96, num_attention_heads=12, num_query_groups=3,
                      tensor_model_parallel_size=tp)
        if tp in (1, 3, 6, 12):
            check_parallel_compatible(cfg, tp, 1)
            TransformerConfig(**kwargs)
        else:
            with pytest.raises(ValueError, match="num_query_groups"):
                TransformerConfig(**kwargs)


def _build_body(rank, world_size):
    from megatron.core import parallel_state

    from megatron_csd.models import build_gpt_model, freeze_teacher
    from megatron_csd.parallel.cpu_mode import enable_cpu_mode, seed_model_parallel_rng

    enable_cpu_mode()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    seed_model_parallel_rng(0)
    tokens = torch.randint(0, 300, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    for name in ("tiny-gemma", "tiny-llama", "tiny-gpt2"):
        cfg = get_preset(name)
        model = build_gpt_model(cfg)
        logits = model(tokens, positions, None)
        assert logits.shape == (2, 8, cfg.padded_vocab_size // world_size)
        assert torch.isfinite(logits).all()
        # The tied Gemma weight is never scaled; the norm weights are stored zero-centred.
        if name == "tiny-gemma":
            assert model.output_layer.weight is None
            assert all(float(p.abs().max()) == 0.0 for n, p in model.named_parameters()
                       if "layernorm" in n)
        freeze_teacher(model)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    # Bf16 parameters.
    model = build_gpt_model(get_preset("tiny-llama"), params_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # FP8 / TE requests without CUDA + TE are start-up errors, never silently ignored.
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_gpt_model(get_preset("tiny-gemma"), fp8="e4m3")
    with pytest.raises(ValueError, match="fp8 must be one of"):
        build_gpt_model(get_preset("tiny-gemma"), fp8="e5m2")
    with pytest.raises(ValueError, match="use_te=True"):
        build_gpt_model(get_preset("tiny-gemma"), use_te=True)
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("megatron_csd.models.builder.transformer_engine_available", return_value=False):
        with pytest.raises(ValueError, match="transformer-engine cannot be imported"):
            build_gpt_model(get_preset("tiny-gemma"), fp8="hybrid")
    # Layouts Megatron cannot split are clear errors naming the field.
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_gpt_model(get_preset("tiny-gemma").replace(num_attention_heads=3, num_query_groups=1))
    with pytest.raises(ValueError, match="num_layers"):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
        build_gpt_model(get_preset("tiny-gemma").replace(num_layers=3))
    parallel_state.destroy_model_parallel()


def _checkpoint_body(rank, world_size, root):
    from megatron.core import dist_checkpointing, parallel_state

    from megatron_csd.models import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, save_model, write_model_config
    from megatron_csd.parallel.cpu_mode import enable_cpu_mode, seed_model_parallel_rng

    enable_cpu_mode()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    cfg = get_preset("tiny-llama")
    tokens = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand(2, 8)
    seed_model_parallel_rng(1)
    source = build_gpt_model(cfg).eval()
    expected = source(tokens, positions, None)
    save_model(source, f"{root}/full", cfg)
    # A checkpoint without `_extra_state` objects (as a TE model meets a local-spec checkpoint)
    # still loads; one without a weight is a clear error.
    sharded = {k: v for k, v in source.sharded_state_dict().items() if "_extra_state" not in k}
    for name, state in (("no_extra", sharded),
                        ("no_norm", {k: v for k, v in sharded.items() if "final_layernorm" not in k})):
        if rank == 0:
            os.makedirs(f"{root}/{name}/model")
            write_model_config(f"{root}/{name}", cfg)
        torch.distributed.barrier()
        dist_checkpointing.save(state, f"{root}/{name}/model")
    seed_model_parallel_rng(2)
    for name in ("full", "no_extra"):
        target = build_gpt_model(cfg).eval()
        assert not torch.equal(target(tokens, positions, None), expected)
        assert load_model(target, f"{root}/{name}") == cfg
        torch.testing.assert_close(target(tokens, positions, None), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="lacks weights.*final_layernorm"):
        load_model(build_gpt_model(cfg), f"{root}/no_norm")
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        load_model(build_gpt_model(cfg.replace(ffn_hidden_size=128)), f"{root}/full")
    with pytest.raises(ValueError, match="already holds files"):
        save_model(source, f"{root}/full", cfg)
    parallel_state.destroy_model_parallel()


def test_build_gpt_model_tp2_shapes_freeze_and_start_up_errors():
    run_distributed(_build_body, 2)


def test_save_load_round_trip_and_missing_pieces(tmp_path):
    run_distributed(_checkpoint_body, 2, str(tmp_path))
