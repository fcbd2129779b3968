"""Attention isolation and per-sample positions for packed rows (megatron_csd.data.packing).

A packed row holds samples k = 0, 1, ... at offsets o_k, marked by `segment_ids` [b, s] (-1 on
the padding tail). Exactness needs two things of every layer, student and teacher alike:

* **Isolation** -- query t may attend key u iff `segment[t] == segment[u] and u <= t`. On the
  local layer spec (Megatron's ``DotProductAttention``) this is an explicit mask
  ``block_causal_mask(segment_ids)`` of shape [b, 1, s, s], True = masked, passed as
  ``GPTModel.forward(attention_mask=...)``; the softmax fills masked scores with -10000 (as for
  the ordinary causal mask), whose exp underflows to exactly 0 in fp32/bf16, so a sample's
  probabilities and outputs do not depend on its neighbours. The mask is built per microbatch
  on every pipeline stage from the stage's own copy of the batch (no extra communication).
* **Positions restart at 0** -- learned absolute embeddings read ``position_ids`` directly.
  RoPE in Megatron's GPTModel ignores ``position_ids`` (it rotates by 0..s-1); for packed rows
  :func:`enable_packed_positions` replaces the model's ``rotary_pos_emb`` by
  :class:`PositionRotary`, which returns the angles gathered at the row's position ids,
  ``freqs[position_ids]`` -> [s, b, 1, d] (broadcast over heads by Megatron's unfused
  ``apply_rotary_pos_emb``). Where the positions are 0..s-1 (unpacked batches, generation
  without a cache) this equals Megatron's own [s, 1, 1, d] table exactly; a KV-cache decode
  step (positions not of the rotary length) falls back to Megatron's table.

The transformer-engine spec is refused here (:func:`check_packing_supported`): its isolation
would be THD + cu_seqlens (``PackedSeqParams``), which this package does not implement yet.
"""
from __future__ import annotations

from typing import Optional

import torch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query t must NOT see key u: a different segment or u > t."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [b, s], got shape {tuple(segment_ids.shape)}")
    s = segment_ids.shape[1]
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return (~(same & causal)).unsqueeze(1)


def packed_attention_mask(batch: dict) -> Optional[torch.Tensor]:
    """The mask for a batch dict: block-diagonal causal when it is packed, else None (the
    attention layer's own causal mask)."""
    segment_ids = batch.get("segment_ids")
    return None if segment_ids is None else block_causal_mask(segment_ids)


class PositionRotary(torch.nn.Module):
    """Megatron's RotaryEmbedding evaluated at per-token position ids (module doc).

    Holds the original module outside the module tree (it has no parameters or persistent
    buffers), so ``state_dict`` keys do not change.
    """

    def __init__(self, rotary: torch.nn.Module):
        super().__init__()
        self._inner = [rotary]
        self.position_ids: Optional[torch.Tensor] = None

    @property
    def inner(self) -> torch.nn.Module:
        return self._inner[0]

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        table = self.inner(max_seq_len, *args, **kwargs)  # [S, 1, 1, d]
        positions = self.position_ids
        if positions is None or kwargs.get("packed_seq") or positions.dim() != 2 \
                or positions.shape[1] != max_seq_len:
            return table
        return table[:, 0, 0, :][positions.t()].unsqueeze(2)  # [s, b, 1, d]


def _capture_positions(rotary: PositionRotary):
    def hook(module, args, kwargs):
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        rotary.position_ids = positions
    return hook


def check_packing_supported(model: torch.nn.Module) -> None:
    """ValueError unless every attention of ``model`` can take the block-diagonal mask."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    config = model.config
    if getattr(config, "window_size", None) is not None:
        raise ValueError("packing is not supported with sliding-window attention (the window "
                         "mask would replace the per-sample mask); run without --packing")
    kind = getattr(model, "position_embedding_type", "learned_absolute")
    if kind not in ("rope", "learned_absolute", "none"):
        raise ValueError(f"packing supports rope / learned_absolute positions, not {kind!r}; "
                         "run without --packing")
    decoder = getattr(model, "decoder", None)
    for layer in getattr(decoder, "layers", []):
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if not isinstance(core, DotProductAttention):
            raise ValueError(
                f"packing needs the local layer spec's attention (a block-diagonal mask); this "
                f"model uses {type(core).__name__} (transformer-engine spec), whose THD + "
                "cu_seqlens path is not implemented yet: run without --packing (PACKING=0)")


def enable_packed_positions(model: torch.nn.Module) -> torch.nn.Module:
    """Check ``model`` (a GPTModel stage) can isolate packed samples; make RoPE follow
    ``position_ids``. Idempotent; returns the model."""
    check_packing_supported(model)
    rotary = getattr(model, "rotary_pos_emb", None)
    if getattr(model, "position_embedding_type", None) == "rope" and rotary is not None \
            and not isinstance(rotary, PositionRotary):
        wrapper = PositionRotary(rotary)
        model.rotary_pos_emb = wrapper
        model.register_forward_pre_hook(_capture_positions(wrapper), with_kwargs=True)
    return model
