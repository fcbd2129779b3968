"""Row-chunked building blocks shared by the objectives.

Every objective streams over `[rows, V_local]` logits in row chunks of about `CHUNK_ELEMENTS`
elements, so temporaries stay cache-sized and no `[rows, V]` temporary is ever allocated.

Masked vocabulary: a column that is -inf in the student or the teacher is excluded exactly like
padding. Rows that contain such a column ("masked rows") are found from the row minima at no
extra cost (`torch.aminmax` yields the max the softmaxes need anyway) and only those rows take
the slower path with an explicit column mask. NaN and +inf are *not* treated as masks: they
propagate into the loss so that a broken model is visible.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch

CHUNK_ELEMENTS = 1 << 17


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics run in fp32 for fp32/bf16/fp16 logits, and in fp64 for fp64 logits (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(num_rows: int, num_cols: int) -> Iterator[Tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def valid_columns(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Boolean mask of columns that are finite-from-below (not -inf) in both inputs."""
    return (student != float("-inf")) & (teacher != float("-inf"))


def local_row_maxima(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local per-row maxima over the valid columns, and which rows have masked columns.

    Returns `maxima` [rows, 2] in the accumulation dtype (student max, teacher max; -inf where a row has no valid
    column on this shard) and `masked` [rows] bool. No communication.
    """
    num_rows, width = student.shape
    maxima = torch.full((num_rows, 2), float("-inf"), dtype=accumulation_dtype(student.dtype),
                        device=student.device)
    masked = torch.zeros(num_rows, dtype=torch.bool, device=student.device)
    if width == 0:
        return maxima, masked
    for start, end in row_chunks(num_rows, width):
        zs, zt = student[start:end], teacher[start:end]
        min_s, max_s = torch.aminmax(zs, dim=-1)
        min_t, max_t = torch.aminmax(zt, dim=-1)
        maxima[start:end, 0] = max_s
        maxima[start:end, 1] = max_t
        rows = ((min_s == float("-inf")) | (min_t == float("-inf"))).nonzero().squeeze(-1)
        if rows.numel():
            valid = valid_columns(zs[rows], zt[rows])
            neg_inf = torch.tensor(float("-inf"), dtype=zs.dtype, device=zs.device)
            maxima[start + rows, 0] = torch.where(valid, zs[rows], neg_inf).amax(-1).to(maxima.dtype)
            maxima[start + rows, 1] = torch.where(valid, zt[rows], neg_inf).amax(-1).to(maxima.dtype)
            masked[start + rows] = True
    return maxima, masked


def finish_maxima(maxima: torch.Tensor) -> torch.Tensor:
    """After the MAX all-reduce: rows with no valid column anywhere ("empty") get shift 0.

    Returns the [rows] bool `empty` mask; `maxima` is fixed in place so that shifted logits stay
    finite (their weights are zeroed by the column mask anyway).
    """
    empty = maxima[:, 0] == float("-inf")
    maxima.masked_fill_(empty.unsqueeze(-1), 0.0)
    return empty


def safe_denominator(total: torch.Tensor) -> torch.Tensor:
    """`total` with zeros replaced by ones (an empty row has numerator 0 too)."""
    return torch.where(total > 0, total, torch.ones_like(total))
