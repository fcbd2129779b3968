"""Tiny HF models (Gemma MQA, LLaMA GQA untied, GPT-2) and their Megatron conversions, shared by
the generation tests (built in a module-scoped fixture; no downloads)."""
from pathlib import Path

import torch

VOCAB = 300
VOCAB_MULTIPLE = 64  # padded to 320: at TP 4 every shard holds real ids (and the last one padding)
PROMPTS = [[1, 5, 9, 33, 7], [1, 100, 200], [1, 42, 43, 44, 45, 46, 47, 48, 49, 50], [1, 7]]


def hf_configs():
    import transformers

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "gemma": transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=1, head_dim=32, **common),
        "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                                          num_key_value_heads=2, tie_word_embeddings=False, **common),
        "gpt2": transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                        bos_token_id=1, eos_token_id=2),
    }


def randomize(model, *, gemma: bool, seed: int = 1234):
    """Weights large enough that a layout bug shows (Gemma stores a norm weight w as 1 + w)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                param.copy_(noise * 0.2 if gemma else 1 + noise * 0.2)
            else:
                param.copy_(noise * (0.05 if name.endswith("bias") else 0.3))
    return model.eval()


def build_models(root: Path, names=("gemma", "llama", "gpt2")) -> dict:
    """Save each tiny HF model under root/hf_NAME and convert it to root/mg_NAME."""
    import transformers

    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    models = {}
    for name, config in hf_configs().items():
        if name not in names:
            continue
        model = randomize(transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager"),
                          gemma=name == "gemma")
        model.save_pretrained(root / f"hf_{name}")
        convert_hf_to_megatron(root / f"hf_{name}", root / f"mg_{name}", vocab_multiple=VOCAB_MULTIPLE)
        models[name] = model
    return models


def hf_greedy(model, prompt, max_new_tokens, eos_id=2):
    """transformers' greedy completion of one prompt (ids after the prompt, eos dropped)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_id, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(eos_id)] if eos_id in out else out


def reference_probs(logits, temperature, top_k, top_p):
    """softmax(logits / T) restricted by transformers' TopK then TopP warpers (fp64)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    scores = logits.double().unsqueeze(0) / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0]


def chi_square(counts, expected_probs, total):
    expected = expected_probs * total
    big = expected >= 5
    small_obs, small_exp = counts[~big].sum(), expected[~big].sum()  # pooled sparse bins
    stat = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
    dof = int(big.sum()) - 1
    if small_exp > 0:
        stat = stat + (small_obs - small_exp) ** 2 / small_exp
        dof += 1
    return float(stat), dof
