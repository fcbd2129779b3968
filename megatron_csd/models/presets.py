"""Named model presets (sizes of the published HF checkpoints, and tiny ones for tests)."""
from __future__ import annotations

from megatron_csd.models.config import ModelConfig

_PRESETS: dict[str, dict] = {
    # google/gemma-2b(-it): multi-query attention (1 KV head), head_dim 256.
    "gemma-2b": dict(family="gemma", num_layers=18, hidden_size=2048, ffn_hidden_size=16384,
                     num_attention_heads=8, num_query_groups=1, kv_channels=256,
                     vocab_size=256000, max_position_embeddings=8192, norm_epsilon=1e-6,
                     rope_theta=10000.0, tie_embeddings=True),
    # google/gemma-7b(-it): 16 heads x 256 = 4096 != hidden 3072.
    "gemma-7b": dict(family="gemma", num_layers=28, hidden_size=3072, ffn_hidden_size=24576,
                     num_attention_heads=16, num_query_groups=16, kv_channels=256,
                     vocab_size=256000, max_position_embeddings=8192, norm_epsilon=1e-6,
                     rope_theta=10000.0, tie_embeddings=True),
    "gpt2": dict(family="gpt2", num_layers=12, hidden_size=768, ffn_hidden_size=3072,
                 num_attention_heads=12, vocab_size=50257, max_position_embeddings=1024,
                 norm_epsilon=1e-5, tie_embeddings=True),
    "gpt2-medium": dict(family="gpt2", num_layers=24, hidden_size=1024, ffn_hidden_size=4096,
                        num_attention_heads=16, vocab_size=50257, max_position_embeddings=1024,
                        norm_epsilon=1e-5, tie_embeddings=True),
    "gpt2-large": dict(family="gpt2", num_layers=36, hidden_size=1280, ffn_hidden_size=5120,
                       num_attention_heads=20, vocab_size=50257, max_position_embeddings=1024,
                       norm_epsilon=1e-5, tie_embeddings=True),
    "gpt2-xl": dict(family="gpt2", num_layers=48, hidden_size=1600, ffn_hidden_size=6400,
                    num_attention_heads=25, vocab_size=50257, max_position_embeddings=1024,
                    norm_epsilon=1e-5, tie_embeddings=True),
    # meta-llama/Llama-2-7b-hf.
    "llama-7b": dict(family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                     num_attention_heads=32, vocab_size=32000, max_position_embeddings=4096,
                     norm_epsilon=1e-5, rope_theta=10000.0, tie_embeddings=False),
    # openlm-research/open_llama_3b(_v2): head_dim 100.
    "openllama-3b": dict(family="llama", num_layers=26, hidden_size=3200, ffn_hidden_size=8640,
                         num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048,
                         norm_epsilon=1e-6, rope_theta=10000.0, tie_embeddings=False),
    "openllama-7b": dict(family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                         num_attention_heads=32, vocab_size=32000, max_position_embeddings=2048,
                         norm_epsilon=1e-6, rope_theta=10000.0, tie_embeddings=False),
    # Tiny models for tests and the CPU example (vocab 300 pads to 1024). Head dims are powers
    # of 4 so the softmax scale 1/sqrt(d) is exact (as for the real models' 256 / 64 / 128).
    "tiny-gemma": dict(family="gemma", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                       num_attention_heads=4, num_query_groups=1, kv_channels=16,
                       vocab_size=300, max_position_embeddings=128, norm_epsilon=1e-6,
                       rope_theta=10000.0, tie_embeddings=True),
    "tiny-gemma-mha": dict(family="gemma", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                           num_attention_heads=4, num_query_groups=4, kv_channels=16,
                           vocab_size=300, max_position_embeddings=128, norm_epsilon=1e-6,
                           rope_theta=10000.0, tie_embeddings=True),
    "tiny-llama": dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=160,
                       num_attention_heads=4, num_query_groups=2, vocab_size=300,
                       max_position_embeddings=128, norm_epsilon=1e-5, rope_theta=10000.0,
                       tie_embeddings=False),
    "tiny-gpt2": dict(family="gpt2", num_layers=2, hidden_size=64, ffn_hidden_size=256,
                      num_attention_heads=4, vocab_size=300, max_position_embeddings=128,
                      norm_epsilon=1e-5, tie_embeddings=True),
}

PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for the named preset (see PRESET_NAMES)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {', '.join(PRESET_NAMES)}")
    return ModelConfig(**_PRESETS[name])
