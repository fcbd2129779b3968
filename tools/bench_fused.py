#!/usr/bin/env python
"""Benchmark the last stage's output layer + loss: unfused (full logits) vs fused (token chunks).

    python tools/bench_loss.py --fused --tokens 8192 --vocab 256000 --tp 2 --json F
    python tools/bench_fused.py --tokens 8192 --vocab 256000 --tp 2 --json F      (the same)

Per path a fresh group of ``--tp`` gloo processes (Megatron TP group, CPU) runs the last stage's
work for one microbatch of ``tokens`` response tokens: student and teacher output layers
(hidden size ``--hidden``, small so that the loss dominates; fp32) and the training loss
(``--objective``, ``--kd-ratio``; the logged CE as in training), forward + backward.
unfused: ``H W^T`` as Megatron's ColumnParallelLinear (all-reduce of dH), the ``[b, s, V/TP]``
logits of both models, ``objective.loss_func``; fused: ``fused_objective.fused_loss_func``.

Memory: peak RSS (VmHWM after a reset) of rank 0 during its first forward + backward, minus its
RSS once the inputs exist; also in units of one fp32 ``[tokens, V/TP]`` buffer. Time: median of
``--repeats`` runs after one warm-up, barriers around each run, rank 0's wall time; with both
paths, the reported ``unfused_ms``, ``fused_ms`` and ``time_ratio`` (median of per-round ratios)
come from one more group in which the two paths alternate run by run. The JSON
also records ``forward_only_ms`` (the fused forward without gradients: what a chunk-wise
recompute in the backward would add) and the machine's ``uptime`` load before and after.
``--chunk-mb`` sets the fused chunk budget (default: the library's); scale it with the
``[tokens, V/TP]`` buffer to mimic a large shape at a smaller one. ``--paths fused`` skips the
unfused run (whose logits may not fit in memory at the full shape).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import time


def _status_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def make_spec(args, group, rank, tp):
    from megatron_csd.losses import LossConfig
    from megatron_csd.training.objective import ObjectiveSpec

    objective, _, weights = args.objective.partition("-")
    return ObjectiveSpec(distill=True, loss_config=LossConfig(objective, weights=weights or "SS"),
                         kd_ratio=args.kd_ratio, vocab_size=args.vocab, padded_vocab_size=args.vocab,
                         tp_group=group, tp_rank=rank, tp_size=tp)


def make_inputs(args, rank, tp, device="cpu", dtype=None):
    """Hidden states ``[tokens, 1, h]``, the weight shards (student's a Parameter), the batch."""
    import torch

    gen = torch.Generator().manual_seed(0)
    local = args.vocab // tp
    hidden = torch.randn(args.tokens, 1, args.hidden, generator=gen)  # [s, b, h], b = 1
    teacher_hidden = torch.randn(args.tokens, 1, args.hidden, generator=gen)
    weights = [torch.randn(args.vocab, args.hidden, generator=gen)[rank * local:(rank + 1) * local].clone()
               .mul_(args.hidden ** -0.5 * 3) for _ in range(2)]
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=gen)
    mask = torch.ones(1, args.tokens)
    mask[:, : args.tokens // 10] = 0  # a prompt
    move = lambda t: t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
    batch = {"labels": labels.to(device), "loss_mask": mask.to(device)}
    return move(hidden), torch.nn.Parameter(move(weights[0])), move(teacher_hidden), move(weights[1]), batch


def make_step(path, hidden, weight, teacher_hidden, teacher_weight, batch, spec, group):
    """``step(grad=True) -> (loss_sum, dH, dW)``: one forward (+ backward) of the last stage's
    output layers and loss, ``path`` "unfused" (full logits) or "fused" (token chunks)."""
    import torch
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from megatron_csd.models.output_capture import HeadInputs
    from megatron_csd.training.fused_objective import FusedHeads, fused_loss_func
    from megatron_csd.training.objective import loss_func

    def step(grad=True):
        h = hidden.detach().requires_grad_(grad)
        weight.grad = None
        with torch.set_grad_enabled(grad):
            if path == "fused":
                heads = FusedHeads(HeadInputs(h, weight, False, group), HeadInputs(teacher_hidden, teacher_weight, False, group))
                loss_sum = fused_loss_func(batch, heads, spec, False)[0]
            else:
                student = torch.matmul(copy_to_tensor_model_parallel_region(h, group=group), weight.t())
                with torch.no_grad():
                    teacher = torch.matmul(teacher_hidden, teacher_weight.t()).transpose(0, 1).contiguous()
                loss_sum = loss_func(batch, teacher, spec, False, student.transpose(0, 1).contiguous())[0]
                del student, teacher
        if grad:
            loss_sum.backward()
        return loss_sum.detach(), h.grad, weight.grad

    return step


def _worker(rank, tp, port, args, path, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // tp))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    from megatron_csd.training import fused_loss

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    if args.chunk_mb:
        fused_loss.CHUNK_BYTES = int(args.chunk_mb * 2**20)
    spec = make_spec(args, group, rank, tp)
    hidden, weight, teacher_hidden, teacher_weight, batch = make_inputs(args, rank, tp)

    def timed(grad=True, step=None):
        dist.barrier(group=group)
        start = time.perf_counter()
        step(grad)
        dist.barrier(group=group)
        return time.perf_counter() - start

    if path == "interleaved":  # both paths alternate run by run (they share the machine's conditions)
        steps = [make_step(p, hidden, weight, teacher_hidden, teacher_weight, batch, spec, group)
                 for p in ("unfused", "fused")]
        for one in steps:
            timed(step=one)
        rounds = [[timed(step=one) for one in steps] for _ in range(args.repeats)]
        if rank == 0:
            queue.put({"unfused_ms": statistics.median(r[0] for r in rounds) * 1e3,
                       "fused_ms": statistics.median(r[1] for r in rounds) * 1e3,
                       "time_ratio": statistics.median(r[1] / r[0] for r in rounds)})
        dist.barrier()
        dist.destroy_process_group()
        return
    step = make_step(path, hidden, weight, teacher_hidden, teacher_weight, batch, spec, group)
    timed = functools.partial(timed, step=step)

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    baseline = _status_kib("VmRSS")
    warmup = timed()
    peak = (_status_kib("VmHWM") - baseline) * 1024
    times = [timed() for _ in range(args.repeats)]
    result = {"peak_mb": peak / 2**20, "ms": statistics.median(times) * 1e3, "warmup_ms": warmup * 1e3,
              "times_ms": [t * 1e3 for t in times]}
    if path == "fused":
        result["forward_only_ms"] = statistics.median(timed(grad=False) for _ in range(args.repeats)) * 1e3
        result["chunk_tokens"] = fused_loss.chunk_tokens_for(weight.shape[0], args.tokens)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_path(args, path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(rank, args.tp, port, args, path, queue)) for rank in range(args.tp)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"the {path} benchmark processes failed (exit codes {[p.exitcode for p in procs]}); "
                           "out of memory? try fewer --tokens or --paths fused")
    return queue.get()


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of both models (small: the loss dominates)")
    parser.add_argument("--objective", default="csd-SS", help="csd-SS, csd-TS, fkl, rkl, ... (default csd-SS)")
    parser.add_argument("--kd-ratio", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / tp)")
    parser.add_argument("--chunk-mb", type=float, default=0.0, help="fused chunk budget in MiB (0: library default)")
    parser.add_argument("--paths", default="unfused,fused", help="which paths to run (comma-separated)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.vocab % args.tp:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by --tp {args.tp}")
    paths = [p for p in args.paths.split(",") if p]
    if set(paths) - {"unfused", "fused"} or not paths:
        raise SystemExit(f"--paths takes unfused and/or fused, got {args.paths!r}")
    buffer_mb = args.tokens * (args.vocab // args.tp) * 4 / 2**20
    out = {"tokens": args.tokens, "vocab": args.vocab, "tp": args.tp, "hidden": args.hidden,
           "objective": args.objective, "kd_ratio": args.kd_ratio, "repeats": args.repeats,
           "buffer_mb": buffer_mb, "load_before": _load()}
    print(f"# output layer + loss, tokens={args.tokens} V={args.vocab} TP={args.tp} h={args.hidden} fp32; "
          f"one [tokens, V/TP] fp32 buffer = {buffer_mb:.0f} MB\n# load: {out['load_before']}", flush=True)
    for path in paths:
        result = _run_path(args, path)
        for key, value in result.items():
            out[f"{path}_{key}" if not key.startswith(("forward_only", "chunk")) else key] = value
        out[f"{path}_peak_buffers"] = result["peak_mb"] / buffer_mb
        print(f"{path:8s} peak {result['peak_mb']:9.0f} MB ({result['peak_mb'] / buffer_mb:5.2f} buffers)  "
              f"median {result['ms']:8.0f} ms", flush=True)
    if len(paths) == 2:
        out["peak_ratio"] = out["fused_peak_mb"] / out["unfused_peak_mb"]
        for path in paths:  # the fresh-process times above; the reported ones come from the interleaved run
            out[f"{path}_separate_ms"] = out[f"{path}_ms"]
        out.update(_run_path(args, "interleaved"))
        print(f"interleaved: unfused {out['unfused_ms']:.0f} ms, fused {out['fused_ms']:.0f} ms (medians); "
              f"fused / unfused: peak {out['peak_ratio']:.3f}, time {out['time_ratio']:.3f} "
              "(median of per-round ratios)")
    out["load_after"] = _load()
    print(f"# load: {out['load_after']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return out


if __name__ == "__main__":
    main()
