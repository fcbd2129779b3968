#!/usr/bin/env python
"""Benchmark packed vs padded rows: response tokens per second of a distillation step on CPU.

Synthetic instruction set (no tokenizer, random ids): a sample's id count (prompt + response +
eos) is log-normal, `exp(N(mu, 0.8^2))` with mean `--mean-length` (default 180, Dolly-like
prompts plus responses), rounded, clipped to [8, seq_length + 1] (the long tail is truncated at
seq_length 512); its prompt is a uniform 20-80% share of it. The same samples are run

  * padded -- one sample per row (today's default), and
  * packed -- `megatron_csd.data.PackedDataset` bins (`--packing`),

through the same teacher + student (Gemma-style, local layer spec, fp32, TP = PP = 1) with the
same global batch in tokens (`--global-batch` rows of `--seq-length`, `--micro-batch` rows per
microbatch). A step is the trainer's per-microbatch work, forward + backward: teacher forward
(no grad), student forward, CSD SS loss over the response tokens (the unfused `loss_func`),
backward (the optimizer update is the same for both and left out). Method: one warm-up step
each, then `--steps` rounds that alternate padded and packed steps (sharing the machine's
conditions); rows are drawn in order from each layout's seeded sampler. `response_tokens_per_s` = response tokens in the timed steps
/ their summed wall time. Padding fractions are over the whole synthetic set.

    python tools/bench_packing.py --json packing.json           # the README table
    python tools/bench_packing.py --quick --json packing.json   # smaller, a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch


class SyntheticInstructions:
    """The InstructionDataset interface PackedDataset needs, over random ids (module doc)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, mean_length: float, seed: int):
        from megatron_csd.data import build_training_sample

        self._build = build_training_sample
        rng = np.random.default_rng(seed)
        sigma = 0.8
        mu = math.log(mean_length) - sigma ** 2 / 2
        self.num_ids = np.clip(np.rint(rng.lognormal(mu, sigma, num_samples)), 8, seq_length + 1).astype(np.int64)
        self.prompt_lengths = np.maximum(1, np.rint(self.num_ids * rng.uniform(0.2, 0.8, num_samples))).astype(np.int64)
        self.prompt_lengths = np.minimum(self.prompt_lengths, self.num_ids - 1)
        self.ids = [rng.integers(3, vocab_size, n) for n in self.num_ids]
        self.seq_length, self.pad_id = seq_length, 0

    def __len__(self) -> int:
        return len(self.num_ids)

    def sample_num_ids(self) -> np.ndarray:
        return self.num_ids

    def __getitem__(self, index: int) -> dict:
        return self._build(self.ids[index], int(self.prompt_lengths[index]), self.seq_length, self.pad_id)


def _models(vocab: int, seq_length: int):
    from megatron_csd.models import build_gpt_model, freeze_teacher, get_preset
    from megatron_csd.models.packed_attention import enable_packing
    from megatron_csd.training.stage import DistillationStage

    base = get_preset("tiny-gemma").replace(vocab_size=vocab, max_position_embeddings=seq_length)
    teacher_cfg = base.replace(num_layers=4, hidden_size=256, ffn_hidden_size=1024, kv_channels=64)
    student_cfg = base.replace(num_layers=2, hidden_size=128, ffn_hidden_size=512, kv_channels=32)
    teacher, student = build_gpt_model(teacher_cfg), build_gpt_model(student_cfg)
    for model in (teacher, student):
        enable_packing(model, micro_batch_size=1)  # local spec: the mask path (any micro batch)
    freeze_teacher(teacher)
    stage = DistillationStage(student, teacher, student_hidden=128, teacher_hidden=256, post_process=True)
    return stage, student_cfg


def _step(stage, spec, batches) -> tuple[float, int]:
    """(wall seconds, response tokens) of forward + backward over the microbatches."""
    from megatron_csd.models.packed_attention import packed_forward_kwargs
    from megatron_csd.training.objective import loss_func

    stage.zero_grad(set_to_none=True)
    start = time.perf_counter()
    tokens = 0
    for batch in batches:
        student_logits, teacher_logits = stage(batch["tokens"], batch["position_ids"],
                                               **packed_forward_kwargs(batch, stage))
        loss_sum, num_tokens, _ = loss_func(batch, teacher_logits, spec, False, student_logits)
        loss_sum.backward()
        tokens += int(num_tokens)
    return time.perf_counter() - start, tokens


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps (smoke test)")
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--mean-length", type=float, default=180.0)
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=8, help="rows per step")
    parser.add_argument("--micro-batch", type=int, default=2, help="rows per microbatch")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    num_samples = args.num_samples or (2000 if args.quick else 15000)  # Dolly has ~15k
    steps = args.steps or (2 if args.quick else 6)
    if args.global_batch % args.micro_batch:
        raise SystemExit("--global-batch must be a multiple of --micro-batch")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {uptime}", flush=True)

    from megatron_csd.data import BatchIterator, PackedDataset, ResumableSampler
    from megatron_csd.losses import LossConfig
    from megatron_csd.parallel.initialize import initialize_parallel
    from megatron_csd.training.objective import ObjectiveSpec

    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    ctx = initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=5)
    data = SyntheticInstructions(num_samples, args.seq_length, args.vocab_size, args.mean_length, seed=3)
    packed = PackedDataset(data, seed=3)
    report = packed.report()
    print(report.line(), flush=True)
    stage, student_cfg = _models(args.vocab_size, args.seq_length)
    spec = ObjectiveSpec(distill=True, loss_config=LossConfig("csd", weights="SS"), kd_ratio=1.0,
                         vocab_size=args.vocab_size, padded_vocab_size=student_cfg.padded_vocab_size,
                         tp_group=ctx.tp_group, tp_rank=0, tp_size=1)
    micro_per_step = args.global_batch // args.micro_batch
    layouts = {}
    for name, rows in (("padded", data), ("packed", packed)):
        layouts[name] = BatchIterator(rows, ResumableSampler(len(rows), seed=9), args.micro_batch)
    totals = {name: [0.0, 0] for name in layouts}
    for round_index in range(steps + 1):
        for name, iterator in layouts.items():
            batches = [next(iterator) for _ in range(micro_per_step)]
            seconds, tokens = _step(stage, spec, batches)
            if round_index > 0:  # round 0 is the warm-up
                totals[name][0] += seconds
                totals[name][1] += tokens
            print(f"round {round_index} {name}: {seconds:.2f} s, {tokens} response tokens", flush=True)
    rate = {name: tokens / seconds for name, (seconds, tokens) in totals.items()}
    result = {
        "padding_fraction_padded": report.padding_fraction_padded,
        "padding_fraction_packed": report.padding_fraction_packed,
        "response_tokens_per_s_padded": rate["padded"],
        "response_tokens_per_s_packed": rate["packed"],
        "speedup": rate["packed"] / rate["padded"],
        "num_samples": num_samples, "num_packed_rows": len(packed),
        "mean_sample_ids": float(data.num_ids.mean()), "median_sample_ids": float(np.median(data.num_ids)),
        "share_truncated_at_seq_length": float((data.num_ids == args.seq_length + 1).mean()),
        "seq_length": args.seq_length, "global_batch_rows": args.global_batch,
        "micro_batch_rows": args.micro_batch, "timed_steps": steps, "quick": args.quick,
        "threads": torch.get_num_threads(), "uptime": uptime,
    }
    print(json.dumps(result, indent=2), flush=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
