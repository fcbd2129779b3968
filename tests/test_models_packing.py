"""Packed-row attention pieces: the block-diagonal causal mask and per-sample RoPE positions."""
from __future__ import annotations

import torch

from megatron_csd.models.packed_attention import PositionRotary, block_causal_mask, packed_attention_mask


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
