"""The optional pre-training LM term (``--lm-data PATH --lm-coef C``, as in MiniLLM/DistiLLM/ImitKD).

The optimised loss becomes

    L = (1 / N_resp) sum_{response targets} loss[t]  +  C * (1 / N_lm) sum_{text targets} ce[t]

with both counts over the whole global batch. Plain text (a ``.txt`` file whose documents are
separated by blank lines, or JSONL with a ``"text"`` field) is tokenized once (each document
``[bos] + ids + [eos]``), concatenated and cut into windows of ``seq_length + 1`` ids, every
target trained on. Each step draws as many LM microbatches as data microbatches (DistiLLM: one
LM batch per batch) through its own resumable sampler; they run through the same pipeline pass
(interleaved with the data microbatches; the teacher's output for them is unused).

Exact normalisation without touching Megatron's schedule: Megatron scales the summed gradients
by ``1 / N`` where N is the total of the ``num_tokens`` the loss function returns (over
microbatches, broadcast over PP and all-reduced over DP in ``finalize_model_grads``). Data
microbatches return ``(sum loss, N_resp-part)``; LM microbatches return
``(w * sum ce, 0)`` with ``w = C * N_resp / N_lm``, where N_resp and N_lm of the global batch
are known before the forward (the masks are built) and summed with ONE all-reduce over the DP
group per step. The logged ``loss`` is then exactly L; ``ce``/``kd`` stay the response metrics.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

WEIGHT_KEY = "lm_weight"


def read_documents(path: str) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"--lm-data {path} does not exist (a .txt file or JSONL with a 'text' field)")
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".jsonl", ".json")):
            docs = []
            for number, line in enumerate(handle, 1):
                if line.strip():
                    entry = json.loads(line)
                    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
                        raise ValueError(f"{path}:{number}: expected an object with a string 'text' field")
                    docs.append(entry["text"])
        else:
            docs = [d.strip() for d in handle.read().split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"--lm-data {path} holds no text")
    return docs


class LMWindows:
    """Token windows of ``seq_length + 1`` ids over the concatenated documents."""

    def __init__(self, path: str, tokenizer, seq_length: int):
        ids = []
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        for doc in tokenizer.encode_batch(read_documents(path)):
            ids += bos + list(doc) + [tokenizer.eos_id]
        width = seq_length + 1
        if len(ids) < width:
            raise ValueError(f"--lm-data {path} has {len(ids)} tokens, fewer than one window of "
                             f"seq_length + 1 = {width}")
        self.windows = np.asarray(ids[:len(ids) // width * width], dtype=np.int64).reshape(-1, width)
        self.seq_length = seq_length

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        window = torch.from_numpy(self.windows[index].copy())
        return {"tokens": window[:-1], "labels": window[1:],
                "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
                "position_ids": torch.arange(self.seq_length, dtype=torch.int64)}


class LMTerm:
    """Draws the LM microbatches of a step and weights them (see the module docstring)."""

    def __init__(self, windows: LMWindows, *, coef: float, seed: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, dp_group, device: torch.device):
        from megatron_csd.data import BatchIterator, ResumableSampler

        sampler = ResumableSampler(len(windows), seed=seed + 1, dp_rank=dp_rank, dp_size=dp_size)
        self.batches = BatchIterator(windows, sampler, micro_batch_size)
        self.coef = float(coef)
        self.dp_size, self.dp_group, self.device = dp_size, dp_group, device

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)

    def interleave(self, data_batches: list) -> list:
        """``[data_0, lm_0, data_1, lm_1, ...]`` with each LM microbatch's weight attached."""
        lm_batches = [{k: v.to(self.device) for k, v in next(self.batches).items()} for _ in data_batches]
        counts = torch.stack([sum(b["loss_mask"].sum() for b in data_batches),
                              sum(b["loss_mask"].sum() for b in lm_batches)]).to(torch.float64)
        if self.dp_size > 1:
            dist.all_reduce(counts, group=self.dp_group)
        weight = self.coef * counts[0] / counts[1]
        out = []
        for data, lm in zip(data_batches, lm_batches):
            lm[WEIGHT_KEY] = weight.to(torch.float32).reshape(1)
            out += [data, lm]
        return out


def lm_loss_func(batch: dict, spec, names, student_logits: torch.Tensor):
    """``(w * sum ce, 0 tokens, metrics)`` for an LM microbatch; only ``loss`` gets a share."""
    from megatron_csd.training.objective import response_cross_entropy

    mask = batch["loss_mask"] > 0
    ce = response_cross_entropy(student_logits, torch.where(mask, batch["labels"], 0), spec)
    zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
    loss_sum = batch[WEIGHT_KEY][0].to(ce.dtype) * torch.where(mask, ce, zero).sum()
    metrics = {name: torch.zeros(2, dtype=torch.float32, device=ce.device) for name in names}
    metrics["loss"] = torch.stack([loss_sum.detach().to(torch.float32), zero.to(torch.float32)])
    return loss_sum, torch.zeros((), dtype=torch.int, device=ce.device), metrics


def build_lm_term(config, tokenizer, ctx, dp_size: int) -> Optional[LMTerm]:
    on_policy = config.on_policy
    if on_policy.lm_data is None:
        return None
    windows = LMWindows(on_policy.lm_data, tokenizer, config.training.seq_length)
    return LMTerm(windows, coef=on_policy.lm_coef, seed=config.training.seed,
                  micro_batch_size=config.training.micro_batch_size, dp_rank=ctx.dp_rank,
                  dp_size=dp_size, dp_group=ctx.dp_group, device=ctx.device)
