"""Generation on Megatron-Core GPT models at any TP/PP: KV-cached decoding through
megatron.core.inference, layout-independent sampling (Gumbel-max keyed by global vocab id).

    from megatron_csd.generation import SamplingParams, GenerationRequest, generate
"""
from megatron_csd.generation.engine import generate
from megatron_csd.generation.errors import GenerationError
from megatron_csd.generation.loading import LoadedModel, load_for_generation
from megatron_csd.generation.params import GenerationRequest, GenerationResult, SamplingParams

__all__ = ["GenerationError", "GenerationRequest", "LoadedModel", "load_for_generation", "GenerationResult",
           "SamplingParams", "generate"]
