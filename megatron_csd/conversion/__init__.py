"""megatron_csd.conversion: HF <-> Megatron checkpoints (Gemma, LLaMA/Mistral-style, GPT-2).

    from megatron_csd.conversion import convert_hf_to_megatron, convert_megatron_to_hf
    cfg = convert_hf_to_megatron("gemma-2b", "ckpt/gemma-2b", tp=2)   # loads at any TP/PP
    convert_megatron_to_hf("ckpt/gemma-2b", "gemma-2b-roundtrip")

`mapping` holds the tensor layout rules as pure functions; `hf_to_megatron` / `megatron_to_hf`
stream one tensor at a time; `verify` compares logits with transformers.
"""
from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf
from megatron_csd.conversion.verify import check_conversion, compare_logits

__all__ = ["check_conversion", "compare_logits", "convert_hf_to_megatron", "convert_megatron_to_hf"]
