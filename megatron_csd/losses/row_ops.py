"""Row-chunked building blocks shared by the objectives.

Every objective streams over `[rows, V_local]` logits in row chunks of about `CHUNK_ELEMENTS`
elements, so temporaries stay cache-sized and no `[rows, V]` temporary is ever allocated.

Masked vocabulary: a column that is -inf in the student or the teacher is excluded exactly like
padding. Rows that contain such a column ("masked rows") are found from the row minima at no
extra cost (`torch.aminmax` yields the max the softmaxes need anyway) and only those rows take
the slower path with an explicit column mask. NaN and +inf are *not* masks but invalid input:
a row with a NaN or +inf in any real column of either input ("invalid row") gets a NaN loss and
a NaN gradient on every tensor-parallel rank. Invalid rows are found for free from the row maxima
(max reductions propagate NaN, and +inf is its own maximum); each objective then poisons its
rank's contribution to its last SUM all-reduce with NaN (IEEE sums keep NaN, so every rank sees
it; NaN is never fed to the MAX all-reduce, whose NaN handling depends on the backend), and the
backward gives every row whose loss is NaN a NaN gradient (0 * NaN, as dense autograd would).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional, Tuple

import torch

CHUNK_ELEMENTS = 1 << 19

LOSS_THREADS: Optional[int] = None
"""CPU worker threads of the chunk loops (None: torch.get_num_threads()); see for_each_chunk."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics run in fp32 for fp32/bf16/fp16 logits, and in fp64 for fp64 logits (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(num_rows: int, num_cols: int) -> Iterator[Tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


_POOL_LOCK = threading.Lock()
_POOL: Optional[ThreadPoolExecutor] = None
_IN_WORKER = threading.local()


def _start_worker():
    _IN_WORKER.active = True
    torch.set_num_threads(1)  # this worker thread's own OpenMP setting, from its first op on


def in_chunk_worker() -> bool:
    """Whether the caller runs inside one of for_each_chunk's worker threads."""
    return getattr(_IN_WORKER, "active", False)


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="megatron_csd-loss",
                                       initializer=_start_worker)
        return _POOL


def _run_share(chunks, body, rows, width, dtype, device, inference):
    workspace = ChunkWorkspace(rows, width, dtype, device)
    # Grad and inference mode are per thread: take the caller's inference mode; chunk ops are
    # never differentiated.
    with torch.inference_mode(inference), torch.no_grad():
        for start, end in chunks:
            body(start, end, workspace)


def for_each_chunk(num_rows: int, width: int, body: Callable, dtype: torch.dtype, device) -> None:
    """Call ``body(start, end, workspace)`` for every row chunk (disjoint rows; any order).

    On the CPU the chunks are shared among ``LOSS_THREADS`` (default: torch's intra-op thread
    count) Python worker threads, each running its ops with one intra-op thread and its own
    workspace (torch releases the GIL inside its kernels). Chunk ops are small, so with OpenMP
    every one of them would be a parallel region ending in a barrier: when other processes
    compete for the cores, each barrier waits for a descheduled thread and the loop slows
    10-100x, while here the workers only meet once, at the end. On CUDA, or when called from a
    worker itself, the chunks run in order on the calling thread.
    """
    chunks = list(row_chunks(num_rows, width)) if width else []
    workers = min(len(chunks), LOSS_THREADS or torch.get_num_threads())
    if device.type != "cpu" or workers <= 1 or in_chunk_worker():
        workspace = ChunkWorkspace(num_rows, width, dtype, device)
        for start, end in chunks:
            body(start, end, workspace)
        return
    futures, caller_threads = [], torch.get_num_threads()
    try:
        pool, inference = _pool(workers), torch.is_inference_mode_enabled()
        for i in range(workers):
            futures.append(pool.submit(_run_share, chunks[i::workers], body, num_rows, width, dtype, device,
                                       inference))
    finally:
        errors = [future.exception() for future in futures]  # waits for every submitted worker
        # A new worker's set_num_threads(1) also sets torch's process-wide default for threads
        # that start later; put the caller's count back (the caller's own setting never changed).
        torch.set_num_threads(caller_threads)
    for error in errors:
        if error is not None:
            raise error


class ChunkWorkspace:
    """Named fp32 scratch buffers of `[chunk rows, width]`, allocated once per call and reused
    for every chunk: fresh allocations of this size cost page faults on every use."""

    def __init__(self, num_rows: int, width: int, dtype: torch.dtype, device):
        self.rows = min(num_rows, max(1, CHUNK_ELEMENTS // max(width, 1)))
        self.width, self.dtype, self.device = width, dtype, device
        self._buffers = {}

    def buffer(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self.rows, self.width, dtype=self.dtype, device=self.device)
        return self._buffers[name][:rows]


def difference_into(out: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``first - second`` computed in ``out``'s dtype (a bf16 - bf16 op would round the result to bf16)."""
    if first.dtype == out.dtype and second.dtype == out.dtype:
        return torch.sub(first, second, out=out)
    return out.copy_(first).sub_(second)


def valid_columns(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Boolean mask of columns that are finite-from-below (not -inf) in both inputs."""
    return (student != float("-inf")) & (teacher != float("-inf"))


def chunk_row_maxima(zs: torch.Tensor, zt: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """One row chunk: maxima [rows, 2] over valid columns (-inf where none) and the chunk-local
    indices of rows with masked (-inf) columns."""
    # amax then amin: the second pass reads the chunk from cache (torch.aminmax is far slower).
    maxima = torch.stack((zs.amax(-1), zt.amax(-1)), dim=-1).to(dtype)
    rows = ((zs.amin(-1) == float("-inf")) | (zt.amin(-1) == float("-inf"))).nonzero().squeeze(-1)
    if rows.numel():
        unmasked = maxima[rows]
        valid = valid_columns(zs[rows], zt[rows])
        neg_inf = torch.tensor(float("-inf"), dtype=zs.dtype, device=zs.device)
        maxima[rows, 0] = torch.where(valid, zs[rows], neg_inf).amax(-1).to(dtype)
        maxima[rows, 1] = torch.where(valid, zt[rows], neg_inf).amax(-1).to(dtype)
        # A NaN / +inf facing a -inf column is still invalid input: keep it in the maxima.
        maxima[rows] = torch.where(_is_invalid(unmasked), unmasked, maxima[rows])
    return maxima, rows


def local_row_maxima(student: torch.Tensor, teacher: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local per-row maxima over the valid columns, and which rows have masked columns.

    Returns `maxima` [rows, 2] in the accumulation dtype (student max, teacher max; -inf where a
    row has no valid column on this shard) and `masked` [rows] bool. No communication.
    """
    num_rows, width = student.shape
    dtype = accumulation_dtype(student.dtype)
    maxima = torch.full((num_rows, 2), float("-inf"), dtype=dtype, device=student.device)
    masked = torch.zeros(num_rows, dtype=torch.bool, device=student.device)
    if width == 0:
        return maxima, masked
    for start, end in row_chunks(num_rows, width):
        maxima[start:end], rows = chunk_row_maxima(student[start:end], teacher[start:end], dtype)
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


def _is_invalid(values: torch.Tensor) -> torch.Tensor:
    return values.isnan() | (values == float("inf"))


def invalid_rows(maxima: torch.Tensor) -> torch.Tensor:
    """[rows] bool: rows whose local [rows, 2] maxima (unmasked, before any all-reduce) are NaN or
    +inf, i.e. rows with a NaN or +inf somewhere in either input. O(rows), no communication."""
    return _is_invalid(maxima).any(-1)


def zero_empty_rows_(values: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Rows with no usable column anywhere get 0, in place, unless they are NaN (invalid input
    on some rank: a NaN must never become a number)."""
    mask = empty.view(-1, *([1] * (values.dim() - 1))) & ~values.isnan()
    return values.masked_fill_(mask, 0.0)


def nan_where_loss_is_nan_(row_coeff: torch.Tensor, loss_is_nan: torch.Tensor) -> torch.Tensor:
    """Backward: the per-row gradient coefficient becomes NaN on rows whose loss is NaN (dense
    autograd gives upstream * NaN = NaN there, even for a zero upstream gradient)."""
    return row_coeff.masked_fill_(loss_is_nan, float("nan"))


def safe_denominator(total: torch.Tensor) -> torch.Tensor:
    """`total` with zeros replaced by ones (an empty row has numerator 0 too)."""
    return torch.where(total > 0, total, torch.ones_like(total))
