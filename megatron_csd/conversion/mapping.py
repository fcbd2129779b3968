"""HF <-> Megatron tensor mapping as pure functions on tensors.

Megatron keys are dist_checkpointing (sharded) keys of a GPTModel built with the
megatron_csd layer spec: per-layer keys `decoder.layers.<suffix>` hold the global
(TP-unsharded) tensor of every layer stacked along a leading layer axis; the others are
plain global tensors. Every rule is a bijection made only of copies, concatenations, views
and transposes, so HF -> Megatron -> HF reproduces each tensor bitwise.

Layouts (see megatron-notes.md, "HF <-> Megatron layout"):
- fused QKV: per query group g, rows [q heads of g | k_g | v_g], i.e. view q as
  [G, H/G*d, h], k and v as [G, d, h], concatenate on dim 1, flatten. Megatron's TP shard is a
  contiguous chunk of dim 0; with fewer KV groups than TP Megatron all-gathers the QKV output
  and slices, so the stored tensor is the same for every TP.
- gated MLP: linear_fc1 = [gate; up] (Megatron's checkpoint factory stores the global gate and
  up blocks in that order whatever the TP).
- GPT-2 Conv1D weights are [in, out]: transposed; c_attn is [q | k | v] along out.
- vocabulary: embedding / untied output rows padded with zeros to padded_vocab_size; export
  drops the padding rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_csd.models.config import ModelConfig

LAYER_PREFIX = "decoder.layers."


def qkv_hf_to_megatron(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, heads: int,
                       groups: int) -> torch.Tensor:
    """[H*d, ...], [G*d, ...], [G*d, ...] -> per-group interleaved [(H+2G)*d, ...]."""
    rest = q.shape[1:]
    grouped = [t.reshape(groups, -1, *rest) for t in (q, k, v)]
    return torch.cat(grouped, dim=1).reshape(-1, *rest)


def qkv_megatron_to_hf(qkv: torch.Tensor, *, heads: int, groups: int, head_dim: int):
    """Inverse of `qkv_hf_to_megatron`: returns contiguous (q, k, v)."""
    rest = qkv.shape[1:]
    per_group = qkv.reshape(groups, (heads // groups + 2) * head_dim, *rest)
    q, k, v = torch.split(per_group, [heads // groups * head_dim, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows so that dim 0 has `rows` entries (vocabulary padding)."""
    if weight.shape[0] > rows:
        raise ValueError(f"cannot pad {weight.shape[0]} rows down to {rows}")
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor <-> its HF source tensors (names may contain `{layer}`)."""

    key: str  # Megatron sharded key, or per-layer suffix under `decoder.layers.`
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_megatron: Callable[..., torch.Tensor]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]

    def names_for(self, layer: int | None) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf_names)


def _identity(t):
    return t


def _single(t):
    return (t.contiguous(),)


def _rule(key, hf_names, hf_shapes, to_megatron=_identity, to_hf=_single):
    if isinstance(hf_names, str):
        hf_names, hf_shapes = (hf_names,), (hf_shapes,)
    return TensorRule(key, tuple(hf_names), tuple(tuple(s) for s in hf_shapes), to_megatron, to_hf)


def _transpose_rule(key, name, hf_shape):
    return _rule(key, name, hf_shape, lambda t: t.t().contiguous(), lambda t: (t.t().contiguous(),))


def conversion_rules(cfg: ModelConfig, hf_prefix: str = "") -> tuple[list[TensorRule], list[TensorRule]]:
    """(global rules, per-layer rules) for `cfg`'s family.

    `hf_prefix` is "model." (Gemma/LLaMA) or "transformer." / "" (GPT-2 files differ).
    """
    h, V, pad = cfg.hidden_size, cfg.vocab_size, cfg.padded_vocab_size
    H, G, d, f = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.ffn_hidden_size
    unpad = lambda t: (t[:V].contiguous(),)  # noqa: E731
    qkv_in = lambda q, k, v: qkv_hf_to_megatron(q, k, v, heads=H, groups=G)  # noqa: E731
    qkv_out = lambda t: qkv_megatron_to_hf(t, heads=H, groups=G, head_dim=d)  # noqa: E731
    p = hf_prefix
    if cfg.family == "gpt2":
        def c_attn_in(weight):  # Conv1D [h, 3h] -> [q; k; v] rows -> per-head interleave
            return qkv_in(*torch.split(weight.t(), H * d, dim=0))

        def c_attn_out(qkv):
            return (torch.cat(qkv_out(qkv), dim=0).t().contiguous(),)

        def c_attn_bias_in(bias):
            return qkv_in(*torch.split(bias, H * d, dim=0))

        def c_attn_bias_out(qkv):
            return (torch.cat(qkv_out(qkv), dim=0),)

        global_rules = [
            _rule("embedding.word_embeddings.weight", p + "wte.weight", (V, h), lambda t: pad_rows(t, pad), unpad),
            _rule("embedding.position_embeddings.weight", p + "wpe.weight", (cfg.max_position_embeddings, h)),
            _rule("decoder.final_layernorm.weight", p + "ln_f.weight", (h,)),
            _rule("decoder.final_layernorm.bias", p + "ln_f.bias", (h,)),
        ]
        layer = p + "h.{layer}."
        layer_rules = [
            _rule("self_attention.linear_qkv.layer_norm_weight", layer + "ln_1.weight", (h,)),
            _rule("self_attention.linear_qkv.layer_norm_bias", layer + "ln_1.bias", (h,)),
            _rule("self_attention.linear_qkv.weight", layer + "attn.c_attn.weight", (h, 3 * h), c_attn_in, c_attn_out),
            _rule("self_attention.linear_qkv.bias", layer + "attn.c_attn.bias", (3 * h,), c_attn_bias_in, c_attn_bias_out),
            _transpose_rule("self_attention.linear_proj.weight", layer + "attn.c_proj.weight", (h, h)),
            _rule("self_attention.linear_proj.bias", layer + "attn.c_proj.bias", (h,)),
            _rule("mlp.linear_fc1.layer_norm_weight", layer + "ln_2.weight", (h,)),
            _rule("mlp.linear_fc1.layer_norm_bias", layer + "ln_2.bias", (h,)),
            _transpose_rule("mlp.linear_fc1.weight", layer + "mlp.c_fc.weight", (h, f)),
            _rule("mlp.linear_fc1.bias", layer + "mlp.c_fc.bias", (f,)),
            _transpose_rule("mlp.linear_fc2.weight", layer + "mlp.c_proj.weight", (f, h)),
            _rule("mlp.linear_fc2.bias", layer + "mlp.c_proj.bias", (h,)),
        ]
    else:
        global_rules = [
            _rule("embedding.word_embeddings.weight", p + "embed_tokens.weight", (V, h), lambda t: pad_rows(t, pad), unpad),
            _rule("decoder.final_layernorm.weight", p + "norm.weight", (h,)),
        ]
        layer = p + "layers.{layer}."
        attn = layer + "self_attn."
        layer_rules = [
            _rule("self_attention.linear_qkv.layer_norm_weight", layer + "input_layernorm.weight", (h,)),
            _rule("self_attention.linear_qkv.weight",
                  (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                  ((H * d, h), (G * d, h), (G * d, h)), qkv_in, qkv_out),
            _rule("self_attention.linear_proj.weight", attn + "o_proj.weight", (h, H * d)),
            _rule("mlp.linear_fc1.layer_norm_weight", layer + "post_attention_layernorm.weight", (h,)),
            _rule("mlp.linear_fc1.weight", (layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"),
                  ((f, h), (f, h)), lambda gate, up: torch.cat([gate, up], dim=0),
                  lambda t: tuple(c.contiguous() for c in torch.chunk(t, 2, dim=0))),
            _rule("mlp.linear_fc2.weight", layer + "mlp.down_proj.weight", (h, f)),
        ]
    if not cfg.tie_embeddings:
        global_rules.append(_rule("output_layer.weight", "lm_head.weight", (V, h),
                                  lambda t: pad_rows(t, pad), unpad))
    return global_rules, layer_rules


def ignorable_hf_names(cfg: ModelConfig, hf_prefix: str) -> set[str]:
    """HF tensors that carry no parameters of their own (buffers, the tied head copy)."""
    names = set()
    if cfg.tie_embeddings:
        names.add("lm_head.weight")
    for layer in range(cfg.num_layers):
        if cfg.family == "gpt2":
            names |= {f"{hf_prefix}h.{layer}.attn.bias", f"{hf_prefix}h.{layer}.attn.masked_bias"}
        else:
            names.add(f"{hf_prefix}layers.{layer}.self_attn.rotary_emb.inv_freq")
    return names


def hf_prefix_for(cfg: ModelConfig, names) -> str:
    """The name prefix used by this HF checkpoint's files."""
    if cfg.family == "gpt2":
        return "transformer." if "transformer.wte.weight" in names else ""
    return "model."
