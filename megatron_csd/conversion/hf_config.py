"""HF `config.json` <-> `ModelConfig`: family detection and the architecture checks.

Supported: Gemma (model_type "gemma"), LLaMA / OpenLLaMA / Mistral-style ("llama", "mistral"
without sliding-window attention), GPT-2 ("gpt2"). Anything the Megatron model would compute
differently (biases in LLaMA attention, RoPE scaling, sliding windows, other activations) is
rejected with a ValueError naming the config field, instead of converting to wrong numbers.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from megatron_csd.models.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("gemma", "llama", "mistral", "gpt2")


def _require(config: dict, key: str) -> Any:
    if key not in config or config[key] is None:
        raise ValueError(f"config.json is missing the field {key!r}")
    return config[key]


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for source in (params, scaling):
        rope_type = source.get("rope_type", source.get("type"))
        if rope_type not in (None, "default"):
            raise ValueError(f"config.json uses RoPE scaling {rope_type!r}; only plain RoPE is supported")
    # transformers 4.x writes a top-level rope_theta, 5.x rope_parameters.rope_theta; the
    # first one that is set wins, and a field present but null (with no other) is an error.
    candidates = [("rope_theta", config.get("rope_theta"), "rope_theta" in config),
                  ("rope_parameters.rope_theta", params.get("rope_theta"), "rope_theta" in params)]
    present = [(field, theta) for field, theta, is_present in candidates if is_present]
    if not present:
        return 10000.0
    field, theta = next(((f, t) for f, t in present if t is not None), present[0])
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"config.json field {field} must be a positive number, got {theta!r}; "
                         "set it to the model's RoPE base (e.g. 10000.0)")
    return float(theta)


def _reject_true(config: dict, *keys: str) -> None:
    for key in keys:
        if config.get(key):
            raise ValueError(f"config.json sets {key}={config[key]!r}, which the Megatron model does "
                             "not implement; this checkpoint cannot be converted")


def hf_config_to_model_config(config: dict, *, padded_vocab_size: Optional[int] = None) -> ModelConfig:
    """The ModelConfig of an HF checkpoint (ValueError for unsupported architectures)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = config.get("architectures")
        raise ValueError(f"unsupported architecture model_type={model_type!r} (architectures={arch}); "
                         f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "gpt2":
        return _gpt2_config(config, padded_vocab_size)
    heads = int(_require(config, "num_attention_heads"))
    hidden = int(_require(config, "hidden_size"))
    common = dict(
        num_layers=int(_require(config, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(config, "intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(_require(config, "vocab_size")),
        padded_vocab_size=padded_vocab_size,
        max_position_embeddings=int(_require(config, "max_position_embeddings")),
        norm_epsilon=float(_require(config, "rms_norm_eps")),
        rope_theta=_rope_theta(config),
    )
    _reject_true(config, "attention_bias", "mlp_bias")
    if model_type == "gemma":
        act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        # Gemma's released configs say "gelu" but mean the tanh approximation (transformers
        # rewrites it the same way).
        if act not in ("gelu", "gelu_pytorch_tanh"):
            raise ValueError(f"Gemma config has hidden_act={act!r}; only the tanh GELU is supported")
        return ModelConfig(family="gemma", tie_embeddings=bool(config.get("tie_word_embeddings", True)),
                           **common)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type} config has hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    if model_type == "mistral" and config.get("sliding_window") not in (None, 0):
        if config["sliding_window"] < common["max_position_embeddings"]:
            raise ValueError(f"config.json sets sliding_window={config['sliding_window']}: sliding-window "
                             "attention is not supported (only full causal attention)")
    return ModelConfig(family="llama", tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                       **common)


def _gpt2_config(config: dict, padded_vocab_size: Optional[int]) -> ModelConfig:
    act = config.get("activation_function", "gelu_new")
    if act != "gelu_new":
        raise ValueError(f"GPT-2 config has activation_function={act!r}; only 'gelu_new' is supported")
    if config.get("scale_attn_weights", True) is not True:
        raise ValueError("GPT-2 config sets scale_attn_weights=false, which is not supported")
    _reject_true(config, "scale_attn_by_inverse_layer_idx", "add_cross_attention")
    hidden = int(_require(config, "n_embd"))
    return ModelConfig(
        family="gpt2",
        num_layers=int(_require(config, "n_layer")),
        hidden_size=hidden,
        ffn_hidden_size=int(config.get("n_inner") or 4 * hidden),
        num_attention_heads=int(_require(config, "n_head")),
        vocab_size=int(_require(config, "vocab_size")),
        padded_vocab_size=padded_vocab_size,
        max_position_embeddings=int(_require(config, "n_positions")),
        norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def model_config_to_hf_config(cfg: ModelConfig, *, dtype: str,
                              original: Optional[dict] = None) -> dict:
    """An HF config.json dict for `cfg` (architecture fields from cfg; token ids and other
    non-architecture fields kept from `original`, the config the model was imported from)."""
    out = copy.deepcopy(original) if original else {}
    for stale in ("rope_scaling", "_name_or_path", "transformers_version"):
        out.pop(stale, None)
    if cfg.family == "gpt2":
        out.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.hidden_size,
                   n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
                   n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_epsilon,
                   vocab_size=cfg.vocab_size, activation_function="gelu_new",
                   tie_word_embeddings=cfg.tie_embeddings)
    else:
        gemma = cfg.family == "gemma"
        if not gemma and out.get("model_type") not in ("llama", "mistral"):
            out["model_type"] = "llama"
        out.update(
            architectures=["GemmaForCausalLM" if gemma else
                           ("MistralForCausalLM" if out.get("model_type") == "mistral" else "LlamaForCausalLM")],
            model_type="gemma" if gemma else out["model_type"],
            hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_query_groups, head_dim=cfg.kv_channels,
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
            vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
            hidden_act="gelu_pytorch_tanh" if gemma else "silu", attention_bias=False)
        out.pop("hidden_activation", None)
        # Both spellings: transformers 5.x reads rope_parameters, 4.x the top-level rope_theta
        # (and would silently fall back to its default base without it).
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        out["rope_theta"] = cfg.rope_theta
        if not gemma:
            out.setdefault("mlp_bias", False)
    out.pop("torch_dtype", None)
    out["dtype"] = _DTYPE_NAMES[dtype]
    return out
