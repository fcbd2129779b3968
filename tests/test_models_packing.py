"""Packed-row attention pieces: the block-diagonal causal mask and per-sample RoPE positions."""
from __future__ import annotations

import pytest
import torch

from megatron_csd.models.packed_attention import (PositionRotary, block_causal_mask, enable_packing,
                                                  packed_attention_mask, packed_forward_kwargs,
                                                  thd_packed_seq_params)


def test_packing_mask_is_block_diagonal_causal():
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, 2, 2]])
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for t in range(6):
            for u in range(6):
                visible = bool(segments[b, t] == segments[b, u]) and u <= t
                assert bool(mask[b, 0, t, u]) == (not visible), (b, t, u)
    assert packed_attention_mask({"tokens": segments}) is None
    assert torch.equal(packed_attention_mask({"segment_ids": segments}), mask)


def test_packing_rotary_angles_restart_with_position_ids():
    class Rotary(torch.nn.Module):  # Megatron's RotaryEmbedding contract: [S, 1, 1, d] angles
        def forward(self, max_seq_len, offset=0, packed_seq=False, cp_group=None):
            inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
            freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32) + offset, inv_freq)
            return torch.cat([freqs, freqs], dim=-1)[:, None, None, :]

    rotary = Rotary()
    wrapper = PositionRotary(rotary)
    table = rotary(6)                                     # [6, 1, 1, 8]: angles of positions 0..5
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    wrapper.position_ids = positions
    got = wrapper(6)
    assert got.shape == (6, 2, 1, 8)
    for b in range(2):
        for t in range(6):
            assert torch.equal(got[t, b, 0], table[positions[b, t], 0, 0])
    assert torch.equal(got[:, 1:], table)                 # 0..s-1 is Megatron's own table
    wrapper.position_ids = positions[:, :1]               # a decode step: Megatron's table
    assert torch.equal(wrapper(6), table)
    assert list(wrapper.state_dict()) == []


class TEDotProductAttention:  # stands in for Megatron's TE attention (same class name)
    pass


def _fake_gpt(core, window_size=None):
    layer = type("Layer", (), {"self_attention": type("SA", (), {"core_attention": core})()})()
    return _Fake(layer, window_size)


class _Fake(torch.nn.Module):
    def __init__(self, layer, window_size):
        super().__init__()
        self.config = type("C", (), {"window_size": window_size})()
        self.position_embedding_type = "rope"
        self.decoder = type("D", (), {"layers": [layer]})()
        self.seen = []

    def forward(self, input_ids, position_ids, attention_mask=None, **kwargs):
        self.seen.append((attention_mask, kwargs.get("packed_seq_params")))
        return torch.zeros(*input_ids.shape, 4)


def test_packing_refused_where_samples_cannot_be_isolated():
    with pytest.raises(ValueError, match="cannot isolate samples in attention object"):
        enable_packing(_fake_gpt(object()), micro_batch_size=1)
    with pytest.raises(ValueError, match="sliding-window"):
        enable_packing(_fake_gpt(TEDotProductAttention(), window_size=(4, 0)), micro_batch_size=1)
    with pytest.raises(ValueError, match="THD rows and needs --micro-batch-size 1"):
        enable_packing(_fake_gpt(TEDotProductAttention()), micro_batch_size=2)
    assert enable_packing(_fake_gpt(TEDotProductAttention()), micro_batch_size=1) == "thd"


def test_packing_thd_params_mark_every_sample_boundary():
    params = thd_packed_seq_params(torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]]))
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 5, 6, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 3
    with pytest.raises(ValueError, match="one row per microbatch"):
        thd_packed_seq_params(torch.zeros(2, 8, dtype=torch.long))


def test_packing_student_and_teacher_get_the_same_metadata_through_the_stage():
    """The forward kwargs of a packed batch reach both models of a DistillationStage: the same
    mask on the local spec, the same THD params on the TE spec; unpacked batches pass None."""
    from megatron_csd.training.stage import DistillationStage

    tokens = torch.zeros(1, 6, dtype=torch.long)
    packed = {"tokens": tokens, "position_ids": torch.tensor([[0, 1, 0, 1, 2, 0]]),
              "segment_ids": torch.tensor([[0, 0, 1, 1, 1, -1]])}
    for core, kind in ((TEDotProductAttention(), "thd"), (None, "mask")):
        student, teacher = _fake_gpt(core), _fake_gpt(core)
        if kind == "thd":
            enable_packing(student, micro_batch_size=1)
        for p in teacher.parameters():
            p.requires_grad_(False)
        stage = DistillationStage(student, teacher, student_hidden=4, teacher_hidden=4, post_process=True)
        stage(tokens, packed["position_ids"], **packed_forward_kwargs(packed, stage))
        stage(tokens, packed["position_ids"], **packed_forward_kwargs({"tokens": tokens}, stage))
        (s_mask, s_thd), (s_mask0, s_thd0) = student.seen
        (t_mask, t_thd), (t_mask0, t_thd0) = teacher.seen
        assert s_mask0 is None and t_mask0 is None and s_thd0 is None and t_thd0 is None
        if kind == "thd":
            assert s_mask is None and t_mask is None and s_thd is t_thd
            assert s_thd.cu_seqlens_q.tolist() == [0, 2, 5, 6]
        else:
            assert s_thd is None and t_thd is None and s_mask is t_mask
            assert torch.equal(s_mask, block_causal_mask(packed["segment_ids"]))
