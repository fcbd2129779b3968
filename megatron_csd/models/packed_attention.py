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
  :func:`enable_packing` replaces the model's ``rotary_pos_emb`` by
  :class:`PositionRotary`, which returns the angles gathered at the row's position ids,
  ``freqs[position_ids]`` -> [s, b, 1, d] (broadcast over heads by Megatron's unfused
  ``apply_rotary_pos_emb``). Where the positions are 0..s-1 (unpacked batches) this equals
  Megatron's own [s, 1, 1, d] table exactly; under an inference context (generation) or for
  positions not of the rotary length, Megatron's table is used. (RoPE scores depend on u - t
  only, so with isolation the restart changes fp rounding, not the math; it keeps packed rows
  bit-for-bit on the same angles as unpacked ones.)

On the transformer-engine spec the isolation is THD instead (written, **unverified on a GPU**):
with micro batch size 1 the row's segments become ``PackedSeqParams(qkv_format="thd",
cu_seqlens_q = cu_seqlens_kv = [0, end_0, end_1, ..., s])`` (:func:`thd_packed_seq_params`), passed
as ``GPTModel.forward(packed_seq_params=...)`` to student and teacher; TE's attention then never
crosses a boundary and Megatron's RoPE restarts at each ``cu_seqlens`` entry. Layer specs that can
do neither are refused (:func:`packing_mode`), never silently cross-attended.
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
        inference = kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        rotary.position_ids = None if inference else positions  # generation: Megatron's table
    return hook


MODE_ATTR = "_csd_packing_mode"  # "mask" | "thd", set on a GPTModel by enable_packing


def packing_refusal(window_size, position_embedding_type: str) -> Optional[str]:
    """Why a model with this attention window and position embedding cannot be packed (None:
    it can, given a layer spec that isolates samples). Pure, so that ``training.packing: auto``
    can decide from a ModelConfig before any model is built; :func:`packing_mode` applies the
    same rule to a built model."""
    if window_size is not None:
        return "sliding-window attention (the window mask would replace the per-sample mask)"
    if position_embedding_type not in ("rope", "learned_absolute", "none"):
        return f"{position_embedding_type!r} positions (packing supports rope / learned_absolute)"
    return None


def packing_mode(model: torch.nn.Module) -> str:
    """``"mask"`` (local spec), ``"thd"`` (transformer-engine spec) or ValueError."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    refusal = packing_refusal(getattr(model.config, "window_size", None),
                              getattr(model, "position_embedding_type", "learned_absolute"))
    if refusal is not None:
        raise ValueError(f"packing is not supported with {refusal}; run without --packing")
    modes = set()
    for layer in getattr(getattr(model, "decoder", None), "layers", []):
        core = getattr(getattr(layer, "self_attention", None), "core_attention", None)
        if isinstance(core, DotProductAttention):
            modes.add("mask")
        elif type(core).__name__ == "TEDotProductAttention":
            modes.add("thd")
        else:
            raise ValueError(f"packing cannot isolate samples in attention {type(core).__name__}: "
                             "run without --packing (PACKING=0)")
    if len(modes) > 1:
        raise ValueError("packing needs one attention kind in all layers; run without --packing")
    return modes.pop() if modes else "mask"


def enable_packing(model: torch.nn.Module, *, micro_batch_size: int) -> str:
    """Check ``model`` (a GPTModel stage) can isolate packed samples and prepare it: the local
    spec's RoPE follows ``position_ids``; the TE spec (THD) needs micro batch size 1. Returns
    the mode; idempotent."""
    mode = packing_mode(model)
    if mode == "thd" and micro_batch_size != 1:
        raise ValueError(f"packing on the transformer-engine layer spec uses THD rows and needs "
                         f"--micro-batch-size 1 (got {micro_batch_size}); raise "
                         "--global-batch-size instead, or run without --packing")
    rotary = getattr(model, "rotary_pos_emb", None)
    if mode == "mask" and getattr(model, "position_embedding_type", None) == "rope" \
            and rotary is not None and not isinstance(rotary, PositionRotary):
        wrapper = PositionRotary(rotary)
        model.rotary_pos_emb = wrapper
        model.register_forward_pre_hook(_capture_positions(wrapper), with_kwargs=True)
    setattr(model, MODE_ATTR, mode)
    return mode


def thd_packed_seq_params(segment_ids: torch.Tensor):
    """PackedSeqParams of one packed row ``[1, s]``: a sequence per run of equal segment ids
    (the padding tail is one more sequence), ``cu_seqlens`` int32 on the row's device."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.dim() != 2 or segment_ids.shape[0] != 1:
        raise ValueError(f"THD packing takes one row per microbatch, got segment_ids of shape "
                         f"{tuple(segment_ids.shape)}")
    row = segment_ids[0]
    starts = torch.nonzero(row[1:] != row[:-1]).flatten() + 1
    edges = torch.cat([starts.new_zeros(1), starts, starts.new_full((1,), row.numel())])
    cu_seqlens = edges.to(torch.int32)
    max_seqlen = int((edges[1:] - edges[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def _mode_of(model) -> str:
    while not hasattr(model, MODE_ATTR) and hasattr(model, "module"):
        model = model.module  # DDP -> DistillationStage -> student GPTModel
    return getattr(model, MODE_ATTR, "mask")


def packed_forward_kwargs(batch: dict, model) -> dict:
    """Keyword arguments of the stage's forward for ``batch``: ``attention_mask`` (None for an
    unpacked batch, the block-diagonal causal mask for a packed one on the local spec), or
    ``packed_seq_params`` (THD) for a packed one on the TE spec."""
    segment_ids = batch.get("segment_ids")
    if segment_ids is None:
        return {"attention_mask": None}
    if _mode_of(model) == "thd":
        return {"attention_mask": None, "packed_seq_params": thd_packed_seq_params(segment_ids)}
    return {"attention_mask": block_causal_mask(segment_ids)}
