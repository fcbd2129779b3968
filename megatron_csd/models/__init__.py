"""megatron_csd.models: Megatron-Core GPT students and frozen teachers (Gemma, LLaMA, GPT-2)."""
from megatron_csd.models.builder import (
    build_gpt_model,
    check_parallel_compatible,
    freeze_teacher,
    to_transformer_config,
    transformer_engine_available,
)
from megatron_csd.models.config import FAMILIES, ModelConfig
from megatron_csd.models.presets import PRESET_NAMES, get_preset

__all__ = ["FAMILIES", "ModelConfig", "PRESET_NAMES", "build_gpt_model", "check_parallel_compatible",
           "freeze_teacher", "get_preset", "to_transformer_config", "transformer_engine_available"]
