"""Teacher-forced response loss of reference answers: the per-token CE training reports.

For a file of N records, each sample is tokenized exactly as training tokenizes it
(``megatron_csd.data``: ``bos + prompt + response + eos``, truncation keeping the response,
``loss_mask`` 1 on the response targets and the final eos, 0 on prompt and padding), and

    loss = sum_{samples, t} mask[t] * CE[t] / sum_{samples, t} mask[t]
    CE[t] = -log softmax(z[t])[label[t]]      over the REAL vocabulary (columns >= vocab_size,
                                               Megatron's padding, are set to -inf first)

i.e. the mean per response token over the whole file (not a mean of per-sample means), in nats.

How it runs: the samples are cut, in file order, into micro batches of ``micro_batch_size``
(the last one filled with fully masked dummy rows); micro batch j is assigned to data-parallel
rank ``j % DP``. Each DP rank pushes its micro batches through Megatron's forward-only
pipeline schedule (``get_forward_backward_func``, so any PP works, as in the trainer's
validation), and the last stage computes CE with Megatron's ``vocab_parallel_cross_entropy``
on an fp32 copy of the vocab-parallel logits (one MAX and two SUM all-reduces over TP; the
copy because that function overwrites its input). Each micro batch's ``[sum, count]`` (fp64)
is written to its own row of a ``[num_micro_batches, 2]`` table that is SUM all-reduced over
the world (every other rank holds zeros there: exact), and the rows are summed in order. A
micro batch's numbers do not depend on which rank computed it, so the result is bitwise
independent of DP.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def _response_ce_sums(batch: dict, vocab_size: int, tp_rank: int, tp_size: int, logits: torch.Tensor):
    """The schedule's loss_func: ``(loss_sum, num_tokens, {"ce": fp64 [sum, count]})``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_csd.parallel.vocab import mask_padded_vocab_logits

    logits = mask_padded_vocab_logits(logits.detach().float(), vocab_size, tp_rank=tp_rank, tp_size=tp_size)
    logits = logits.clone()  # vocab_parallel_cross_entropy works in place on its input
    mask = batch["loss_mask"] > 0
    labels = torch.where(mask, batch["labels"], torch.zeros_like(batch["labels"]))
    per_token = vocab_parallel_cross_entropy(logits, labels)
    zero = torch.zeros((), dtype=torch.float64, device=per_token.device)
    total = torch.where(mask, per_token.to(torch.float64), zero).sum()
    count = mask.sum()
    stats = torch.stack([total, count.to(torch.float64)])
    return total.to(torch.float32), count.to(torch.int), {"ce": stats}


def _forward_step(vocab_size: int, tp_rank: int, tp_size: int):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, functools.partial(_response_ce_sums, batch, vocab_size, tp_rank, tp_size)
    return forward_step


def build_micro_batches(samples: Sequence, *, seq_length: int, pad_id: int,
                        micro_batch_size: int) -> list[dict]:
    """Training-style samples (``TokenizedSample``) -> stacked micro batches of a fixed shape."""
    from megatron_csd.data import build_training_sample

    rows = [build_training_sample(s.ids, s.prompt_length, seq_length, pad_id) for s in samples]
    dummy = build_training_sample([pad_id], 1, seq_length, pad_id)  # loss_mask all 0
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        chunk += [dummy] * (micro_batch_size - len(chunk))
        batches.append({key: torch.stack([row[key] for row in chunk]) for key in chunk[0]})
    return batches


def response_loss(model, batches: Sequence[dict], ctx, *, vocab_size: int, seq_length: int,
                  micro_batch_size: int) -> tuple[float, int]:
    """(mean per-token CE, number of response tokens) over ``batches`` (see module doc).

    Collective: every rank of the world calls it with the same ``batches``. ``model`` is this
    rank's GPTModel stage in eval mode; ``ctx`` a ``ParallelContext``.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mine = list(range(ctx.dp_rank, len(batches), ctx.dp_size))
    table = torch.zeros(len(batches), 2, dtype=torch.float64, device=ctx.device)
    if mine:
        iterator = iter([{k: v.to(ctx.device) for k, v in batches[j].items()} for j in mine])
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=_forward_step(vocab_size, ctx.tp_rank, ctx.tp_size),
                data_iterator=iterator, model=[model], num_microbatches=len(mine),
                seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True)
        if ctx.is_last_stage and ctx.tp_rank == 0:
            for j, output in zip(mine, outputs):
                table[j] = output["ce"].to(device=ctx.device, dtype=torch.float64)
    dist.all_reduce(table)
    total, count = table[:, 0].sum().item(), table[:, 1].sum().item()
    return (total / count if count > 0 else float("nan")), int(count)


def loss_seq_length(samples: Sequence, tp_size: int, cap: Optional[int] = None) -> int:
    """Sequence length holding the longest sample (``len(ids) - 1``), a multiple of TP."""
    longest = max(len(s.ids) for s in samples) - 1
    if cap is not None:
        longest = min(longest, cap)
    longest = max(longest, 1)
    return -(-longest // tp_size) * tp_size
