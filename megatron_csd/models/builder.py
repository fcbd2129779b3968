"""Build Megatron-Core GPTModels (students and frozen teachers) from a `ModelConfig`.

`to_transformer_config` is the one place where a ModelConfig becomes Megatron's
TransformerConfig. Layer specs:
- local spec (CPU, or GPU without transformer-engine): Megatron's local GPT layer with our
  `HFNorm` for every norm (HF-exact numerics, Gemma's zero-centred (1+w) RMSNorm);
- TE spec (GPU with transformer-engine importable): Megatron's TE layer; norms are fused into
  TE linears and Gemma's (1+w) is TE's `zero_centered_gamma`. Required for an FP8 teacher.
Both specs produce the same `sharded_state_dict` keys, so checkpoints move between them.
Gemma's sqrt(hidden) embedding scale is a forward hook on the embedding output.

Call after `parallel_state.initialize_model_parallel(...)`; TP/PP sizes are read from it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_csd.models.config import ModelConfig
from megatron_csd.models.layers import HFNorm, gelu_pytorch_tanh, gelu_tanh, scale_embedding_output

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def transformer_engine_available() -> bool:
    """True when transformer-engine and Megatron's TE extension import cleanly.

    `import transformer_engine` raises RuntimeError (not ImportError) on machines without
    cuDNN, hence the broad except.
    """
    try:
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _mcore_te  # noqa: F401
    except Exception:  # pylint: disable=broad-except
        return False
    return True


def _resolve_use_te(use_te: Optional[bool], fp8: Optional[str]) -> bool:
    if fp8 is not None:
        if fp8 not in FP8_FORMATS:
            raise ValueError(f"fp8 must be one of {FP8_FORMATS} or None, got {fp8!r}")
        if not torch.cuda.is_available():
            raise ValueError(
                f"fp8={fp8!r} was requested but CUDA is not available: FP8 runs only on a GPU "
                "with transformer-engine (drop the FP8 teacher option on CPU)")
        if not transformer_engine_available():
            raise ValueError(
                f"fp8={fp8!r} was requested but transformer-engine cannot be imported; "
                "Megatron-Core would silently run without FP8. Install "
                "transformer-engine[pytorch] on the GPU machine or drop the FP8 option")
        if use_te is False:
            raise ValueError("fp8 requires the transformer-engine layer spec; do not pass use_te=False")
        return True
    if use_te is None:
        return torch.cuda.is_available() and transformer_engine_available()
    if use_te and not (torch.cuda.is_available() and transformer_engine_available()):
        raise ValueError("use_te=True needs CUDA and an importable transformer-engine; "
                         "pass use_te=None to pick the local spec automatically")
    return bool(use_te)


def uses_te_spec(fp8: Optional[str] = None) -> bool:
    """Whether ``build_gpt_model(use_te=None, fp8=fp8)`` builds the transformer-engine layer spec
    (FP8 always does; otherwise when CUDA and transformer-engine are available)."""
    return fp8 is not None or _resolve_use_te(None, None)


def _tensor_parallel_problem(cfg: ModelConfig, tp_size: int) -> Optional[str]:
    """Why Megatron-Core cannot split `cfg` over `tp_size` tensor-parallel ranks (None: it can)."""
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups
    if heads % tp_size:
        return f"tensor-parallel size {tp_size} must divide num_attention_heads ({heads})"
    if groups >= tp_size and groups % tp_size:
        return (f"tensor-parallel size {tp_size} must divide num_query_groups ({groups}) "
                "when there are at least TP KV groups")
    if groups < tp_size and tp_size % groups:
        # Fewer KV heads than ranks: Megatron replicates each KV head on TP / groups ranks,
        # which needs TP to be a multiple of num_query_groups.
        return (f"tensor-parallel size {tp_size} must be a multiple of num_query_groups "
                f"({groups}) when KV groups are fewer than TP (each KV head is replicated on "
                "TP / num_query_groups ranks)")
    qkv_rows = (heads + 2 * groups) * cfg.kv_channels
    if groups < tp_size and qkv_rows % tp_size:
        return (f"tensor-parallel size {tp_size} must divide the fused QKV rows ({qkv_rows}) "
                f"when KV groups ({groups}) are fewer than TP")
    if cfg.ffn_hidden_size % tp_size:
        return f"tensor-parallel size {tp_size} must divide ffn_hidden_size ({cfg.ffn_hidden_size})"
    if cfg.padded_vocab_size % tp_size:
        return (f"tensor-parallel size {tp_size} must divide padded_vocab_size "
                f"({cfg.padded_vocab_size}); re-pad with padded_vocab_size()")
    return None


def allowed_tensor_parallel_sizes(cfg: ModelConfig) -> list[int]:
    """Every tensor-parallel size Megatron-Core can split `cfg` over (always includes 1)."""
    return [tp for tp in range(1, cfg.num_attention_heads + 1)
            if _tensor_parallel_problem(cfg, tp) is None]


def check_parallel_compatible(cfg: ModelConfig, tp_size: int, pp_size: int) -> None:
    """ValueError when the model cannot be split over TP x PP as Megatron-Core requires."""
    problem = _tensor_parallel_problem(cfg, tp_size)
    if problem is not None:
        raise ValueError(
            f"{problem} (num_attention_heads={cfg.num_attention_heads}, num_query_groups="
            f"{cfg.num_query_groups}); allowed tensor-parallel sizes for this model: "
            f"{allowed_tensor_parallel_sizes(cfg)}")
    if cfg.num_layers % pp_size:
        raise ValueError(f"pipeline-parallel size {pp_size} must divide num_layers "
                         f"({cfg.num_layers})")


def to_transformer_config(cfg: ModelConfig, *, tp_size: int, pp_size: int,
                          params_dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                          fp8_recipe: str = "delayed", sequence_parallel: bool = False,
                          use_cpu_initialization: Optional[bool] = None,
                          perform_initialization: bool = True):
    """The Megatron TransformerConfig for `cfg` (the only ModelConfig -> Megatron translation)."""
    from megatron.core.transformer import TransformerConfig

    if params_dtype not in _PARAM_DTYPES:
        raise ValueError(f"params_dtype must be one of {_PARAM_DTYPES}, got {params_dtype}")
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    if sequence_parallel and tp_size == 1:
        raise ValueError("sequence_parallel needs tensor-parallel size > 1")
    check_parallel_compatible(cfg, tp_size, pp_size)
    if cfg.family == "gemma":
        activation = gelu_pytorch_tanh
    elif cfg.family == "llama":
        activation = F.silu
    else:
        activation = gelu_tanh
    if use_cpu_initialization is None:
        use_cpu_initialization = not torch.cuda.is_available()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.kv_channels,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        layernorm_zero_centered_gamma=cfg.zero_centered_norm,
        activation_func=activation,
        gated_linear_unit=cfg.gated_mlp,
        add_bias_linear=cfg.add_bias,
        add_qkv_bias=cfg.add_bias,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        fp8=fp8,
        fp8_recipe=fp8_recipe if fp8 else "delayed",
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # [] = the whole layer; Megatron's default spelling of that ("full") is deprecated.
        cuda_graph_scope=[],
    )


def layer_block_spec(transformer_config, *, use_te: bool):
    """TransformerBlockSubmodules for this pipeline stage (layer specs + final norm)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        layer_spec = get_gpt_layer_with_transformer_engine_spec()
        final_norm = TENorm
    else:
        layer_spec = get_gpt_layer_local_spec(normalization=transformer_config.normalization)
        layer_spec.submodules.input_layernorm = HFNorm
        layer_spec.submodules.pre_mlp_layernorm = HFNorm
        final_norm = HFNorm
    num_layers = get_num_layers_to_build(transformer_config)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=final_norm)


def build_gpt_model(cfg: ModelConfig, *, pre_process: bool = True, post_process: bool = True,
                    params_dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                    fp8_recipe: str = "delayed", use_te: Optional[bool] = None,
                    parallel_output: bool = True, sequence_parallel: bool = False,
                    perform_initialization: bool = True,
                    use_cpu_initialization: Optional[bool] = None):
    """A Megatron-Core GPTModel for this rank's TP/PP slice of `cfg`.

    `pre_process`/`post_process`: whether this pipeline stage holds the embedding / the final
    norm and output layer (pass `parallel_state.is_pipeline_first_stage()` / `..._last_stage()`).
    `fp8` ("e4m3" | "hybrid"): run the transformer layers in FP8 (teacher); needs CUDA and
    transformer-engine, else ValueError. `use_te`: None = TE spec when available on a GPU.
    `use_cpu_initialization`: None = only without CUDA; True also lets a
    `torch.device("meta")` context build an empty model (the converter does).
    Logits come out `[b, s, padded_vocab / TP]` with `parallel_output=True`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_gpt_model expects a ModelConfig, got {type(cfg).__name__}")
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call parallel_state.initialize_model_parallel(...) before build_gpt_model")
    use_te = _resolve_use_te(use_te, fp8)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    transformer_config = to_transformer_config(
        cfg, tp_size=tp_size, pp_size=pp_size, params_dtype=params_dtype, fp8=fp8,
        fp8_recipe=fp8_recipe, sequence_parallel=sequence_parallel,
        perform_initialization=perform_initialization,
        use_cpu_initialization=use_cpu_initialization)
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=layer_block_spec(transformer_config, use_te=use_te),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percent=1.0,
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
    )
    if pre_process and cfg.embedding_scale is not None:
        scale_embedding_output(model.embedding, cfg.embedding_scale)
    model.csd_model_config = cfg  # read by models.checkpoint.load_model
    return model


def freeze_teacher(model):
    """Freeze a teacher (or a list of model chunks): no gradients, eval mode. Returns it."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        chunk.eval()
    return model
