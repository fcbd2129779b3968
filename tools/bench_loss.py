#!/usr/bin/env python
"""Benchmark the vocab-parallel distillation losses against two baselines measured in the same run.

For each objective: forward + backward wall time of `megatron_csd.losses.distillation_loss` on
`[tokens, V]` logits, beside
  * Megatron-Core's `vocab_parallel_cross_entropy` forward + backward on the same student logits
    (the cost of the loss every Megatron user already pays), and
  * a straightforward dense PyTorch implementation of the same objective, the way the CSD
    authors' code computes it (full softmaxes and elementwise [tokens, V] tensors, autograd).

Method: one warm-up run of each method excluded, then `--repeats` (>= 5) rounds in which the
methods alternate run by run (so they share the machine's conditions); times are medians and
ratios are medians of the per-round ratios. Every run gets fresh clones of the inputs (Megatron's
CE overwrites its input) made outside the timed region. Peak memory is the peak RSS of a fresh subprocess minus
its RSS once the inputs exist, in MB and in units of one fp32 [tokens, V] buffer (the student
gradient itself is one such buffer); for ours it is measured after a first call on 128 rows, which
compiles the CPU kernels (a one-time cost per process, printed as "compile RSS"). TP = 2 runs in two gloo processes, each rank timing its
shard with barriers around every run. The V sweep times CSD SS at growing V to show linear cost.

    python tools/bench_loss.py                 # the README table (about 10 minutes on 2 cores)
    python tools/bench_loss.py --quick         # smaller and faster, for a smoke test
    python tools/bench_loss.py --fused --tokens 8192 --vocab 256000 --tp 2 --json F
                                               # fused output layer + loss (tools/bench_fused.py)
    python tools/bench_loss.py --threads 2 --compete 2 --loop openmp
                                               # a loaded machine: 2 busy processes beside the run

Threads: `--threads N` sets torch's intra-op threads (Megatron CE and dense use them through
OpenMP). Our chunk loops run on N Python worker threads with one intra-op thread each
(`--loop workers`, the library's default on CPU); `--loop openmp` runs them the old way, one
chunk after another with N OpenMP threads inside every small op. `--compete K` starts K
busy-looping processes for the whole run, to show what other jobs on the cores do to each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from bench_fused import _load as uptime, _status_kib  # tools/ is the script's directory
from megatron_csd.losses import LossConfig, distillation_loss, row_ops

OBJECTIVES = {
    "csd-SS": LossConfig("csd", weights="SS"),
    "csd-TS": LossConfig("csd", weights="TS"),
    "csd-UU": LossConfig("csd", weights="UU"),
    "csd-MM": LossConfig("csd", weights="MM"),
    "fkl": LossConfig("fkl"),
    "rkl": LossConfig("rkl"),
    "jsd": LossConfig("jsd"),
    "tvd": LossConfig("tvd"),
    "skl": LossConfig("skl"),
    "srkl": LossConfig("srkl"),
    "dld": LossConfig("dld"),
}


# ----------------------------------------------------------------------------- dense baselines
def dense_loss(student, teacher, cfg: LossConfig):
    """Per-token loss with full [tokens, V] tensors (the authors' style), autograd backward."""
    tau = cfg.temperature
    if cfg.objective == "csd":
        q = torch.softmax(student.detach() / tau, -1)
        p = torch.softmax(teacher / tau, -1)
        uniform = torch.full_like(q, 1.0 / q.shape[-1])
        factors = {"S": q, "T": p, "U": uniform, "M": cfg.mix * p + (1 - cfg.mix) * q}
        gap = student - teacher
        w1, w2 = factors[cfg.weights[0]], factors[cfg.weights[1]]
        m1, m2 = (w1 * gap).sum(-1), (w2 * gap).sum(-1)
        v1 = (w1 * gap * gap).sum(-1) - m1 * m1
        v2 = (w2 * gap * gap).sum(-1) - m2 * m2
        return 0.5 * cfg.scale * (v1 + v2 + (m1 - m2) ** 2)
    if cfg.objective == "dld":
        return 0.5 * cfg.scale * ((student - teacher) ** 2).mean(-1)
    log_q = torch.log_softmax(student / tau, -1)
    log_p = torch.log_softmax(teacher / tau, -1)
    q, p = log_q.exp(), log_p.exp()
    if cfg.objective == "fkl":
        return (p * (log_p - log_q)).sum(-1)
    if cfg.objective == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if cfg.objective == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if cfg.objective == "jsd":
        log_m = torch.log(cfg.beta * p + (1 - cfg.beta) * q)
        return cfg.beta * (p * (log_p - log_m)).sum(-1) + (1 - cfg.beta) * (q * (log_q - log_m)).sum(-1)
    if cfg.objective == "skl":
        return (p * (log_p - torch.log(cfg.skew * p + (1 - cfg.skew) * q))).sum(-1)
    if cfg.objective == "srkl":
        return (q * (log_q - torch.log(cfg.skew * q + (1 - cfg.skew) * p))).sum(-1)
    raise ValueError(cfg.objective)


# ----------------------------------------------------------------------------- timing
def _megatron_ce():
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    return vocab_parallel_cross_entropy


def make_inputs(tokens, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, generator=gen).mul_(3)  # in place: no transient peak
    teacher = torch.randn(tokens, vocab, generator=gen).mul_(3)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    return student, teacher, targets


def run_once(method, student, teacher, targets, cfg, tp_group):
    """One forward + backward; returns seconds. Input clones are made before the clock starts."""
    leaf = student.clone().requires_grad_(True)
    teacher_copy = teacher.clone()
    if tp_group is not None:
        dist.barrier(group=tp_group)
    start = time.perf_counter()
    if method == "ours":
        loss = distillation_loss(leaf, teacher_copy, cfg, tp_group=tp_group)
    elif method == "dense":
        loss = dense_loss(leaf, teacher_copy, cfg)
    elif method == "megatron_ce":
        loss = _megatron_ce()(leaf, targets)
    else:
        raise ValueError(method)
    loss.sum().backward()
    if tp_group is not None:
        dist.barrier(group=tp_group)
    return time.perf_counter() - start


def interleaved_times(methods, student, teacher, targets, cfg, repeats, tp_group=None):
    """Median seconds per method, the methods alternating run by run so that they share the
    machine's conditions, plus the median of the per-round ratios of each method to the first."""
    for method in methods:  # warm-up, excluded
        run_once(method, student, teacher, targets, cfg, tp_group)
    rounds = [[run_once(method, student, teacher, targets, cfg, tp_group) for method in methods]
              for _ in range(repeats)]
    medians = {method: statistics.median(r[i] for r in rounds) for i, method in enumerate(methods)}
    ratios = {method: statistics.median(r[i] / r[0] for r in rounds) for i, method in enumerate(methods)}
    if len(methods) > 2:  # the third method against the second, e.g. dense / ours
        ratios[f"{methods[2]}/{methods[1]}"] = statistics.median(r[2] / r[1] for r in rounds)
    return medians, ratios


def _init_single_process_megatron(port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)


def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- memory
def _reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def memory_child(method, name, tokens, vocab):
    """Runs in a fresh subprocess: prints peak extra RSS (bytes) of one forward + backward."""
    _init_single_process_megatron(_free_port())
    student, teacher, targets = make_inputs(tokens, vocab)
    leaf = student.requires_grad_(True)
    cfg = OBJECTIVES.get(name, LossConfig())
    before_warm_up = _status_kib("VmRSS")
    if method == "ours":  # a first call on fewer rows compiles the CPU kernels (once per process)
        rows = min(tokens, 128)
        distillation_loss(student[:rows].detach().clone().requires_grad_(True), teacher[:rows], cfg).sum().backward()
    warm_up_bytes = (_status_kib("VmRSS") - before_warm_up) * 1024
    _reset_peak_rss()
    baseline = _status_kib("VmRSS")
    if method == "ours":
        loss = distillation_loss(leaf, teacher, cfg)
    elif method == "dense":
        loss = dense_loss(leaf, teacher, cfg)
    else:
        loss = _megatron_ce()(leaf, targets)
    loss.sum().backward()
    print(json.dumps({"extra_bytes": (_status_kib("VmHWM") - baseline) * 1024, "warm_up_bytes": warm_up_bytes}))


def measure_memory(method, name, tokens, vocab):
    out = subprocess.run([sys.executable, __file__, "--memory-child", method, name, str(tokens), str(vocab)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if method == "ours":
        COMPILE_RSS[name] = result["warm_up_bytes"]
    return result["extra_bytes"]


COMPILE_RSS = {}
"""Per objective: RSS growth of the memory child's first call (128 rows), which compiles the kernels."""


# ----------------------------------------------------------------------------- TP = 2
def _tp_worker(rank, world_size, port, tokens, vocab, names, repeats, queue, loop):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    if loop == "openmp":
        row_ops.LOSS_THREADS = 1
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    group = parallel_state.get_tensor_model_parallel_group()
    student, teacher, targets = make_inputs(tokens, vocab)
    local = vocab // world_size
    columns = slice(rank * local, (rank + 1) * local)
    student, teacher = student[:, columns].contiguous(), teacher[:, columns].contiguous()
    results = {}
    for name in names:
        times, ratios = interleaved_times(("megatron_ce", "ours"), student, teacher, targets, OBJECTIVES[name],
                                          repeats, group)
        results[name] = (times["megatron_ce"], times["ours"], ratios["ours"])
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def bench_tp2(tokens, vocab, names, repeats, loop="workers"):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_tp_worker, args=(rank, 2, port, tokens, vocab, names, repeats, queue, loop))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError("TP=2 benchmark processes failed")
    return queue.get()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--fused" in argv:  # output layer + loss, unfused vs fused: tools/bench_fused.py
        from bench_fused import main as bench_fused_main

        return bench_fused_main([a for a in argv if a != "--fused"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated subset of " + ",".join(OBJECTIVES))
    parser.add_argument("--sweep", default="4000,8000,16000,32000", help="V values for the CSD SS sweep ('' to skip)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--no-tp2", action="store_true", help="skip the TP = 2 (gloo) timings")
    parser.add_argument("--quick", action="store_true", help="tokens 1024, csd-SS/rkl only, short sweep")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--loop", choices=("workers", "openmp"), default="workers",
                        help="chunk loops on worker threads (default) or serially with OpenMP ops")
    parser.add_argument("--compete", type=int, default=0, help="busy processes competing for the cores")
    parser.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loop == "openmp":
        row_ops.LOSS_THREADS = 1
    competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.compete)]
    try:
        return _run(args, parser)
    finally:
        for proc in competitors:
            proc.kill()


def _run(args, parser):
    if args.memory_child:
        method, name, tokens, vocab = args.memory_child
        memory_child(method, name, int(tokens), int(vocab))
        return
    if args.quick:
        args.tokens, args.objectives, args.sweep = 1024, "csd-SS,rkl", "4000,32000"
    names = [n for n in args.objectives.split(",") if n]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown objective(s) {unknown}; choose from {list(OBJECTIVES)}")
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (median of at least 5 runs)")

    tokens, vocab = args.tokens, args.vocab
    buffer_mb = tokens * vocab * 4 / 2**20
    print(f"# distillation loss benchmark: tokens={tokens} V={vocab} fp32, torch threads={torch.get_num_threads()}, "
          f"chunk loop={args.loop}, competing busy processes={args.compete}, "
          f"{args.repeats} interleaved rounds after 1 warm-up each; one fp32 [tokens, V] buffer = {buffer_mb:.0f} MB")
    print("# load: " + uptime(), flush=True)
    _init_single_process_megatron(_free_port())
    student, teacher, targets = make_inputs(tokens, vocab)
    ce_mem = None if args.no_memory else measure_memory("megatron_ce", "ce", tokens, vocab)
    print("\n## TP = 1\nEach row alternates Megatron CE, ours and dense run by run; ratios are medians of the "
          "per-round ratios." + ("" if ce_mem is None else f" Megatron CE peak extra RSS: {ce_mem / 2**20:.0f} MB."))
    header = "| objective | Megatron CE ms | ours ms | dense ms | ours / Megatron CE | dense / ours |"
    rule = "|---|---|---|---|---|---|"
    if not args.no_memory:
        header += " ours extra MB (buffers) | dense extra MB (buffers) |"
        rule += "---|---|"
    print(header + "\n" + rule)
    for name in names:
        cfg = OBJECTIVES[name]
        times, ratios = interleaved_times(("megatron_ce", "ours", "dense"), student, teacher, targets, cfg, args.repeats)
        row = (f"| {name} | {times['megatron_ce'] * 1e3:.0f} | {times['ours'] * 1e3:.0f} | {times['dense'] * 1e3:.0f} |"
               f" {ratios['ours']:.2f} | {ratios['dense/ours']:.2f} |")
        if not args.no_memory:
            ours_mem, dense_mem = measure_memory("ours", name, tokens, vocab), measure_memory("dense", name, tokens, vocab)
            row += (f" {ours_mem / 2**20:.0f} ({ours_mem / 2**20 / buffer_mb:.2f}) |"
                    f" {dense_mem / 2**20:.0f} ({dense_mem / 2**20 / buffer_mb:.2f}) |")
        print(row, flush=True)
    if COMPILE_RSS:
        print("Compile RSS (first call on 128 rows, once per process), MB: "
              + ", ".join(f"{name} {size / 2**20:.0f}" for name, size in COMPILE_RSS.items()))

    if not args.no_tp2:
        tp_names = [n for n in names if n in ("csd-SS", "csd-TS", "rkl", "fkl")] or names[:1]
        results = bench_tp2(tokens, vocab, tp_names, args.repeats, args.loop)
        print("\n## TP = 2 (gloo, 2 processes, V/2 columns each; rank 0's times, barriers around each run)\n"
              "| objective | Megatron CE ms | ours ms | ours / Megatron CE |\n|---|---|---|---|")
        for name in tp_names:
            ce_ms, ours_ms, ratio = results[name]
            print(f"| {name} | {ce_ms * 1e3:.0f} | {ours_ms * 1e3:.0f} | {ratio:.2f} |")

    sweep = [int(v) for v in args.sweep.split(",") if v]
    if sweep:
        print(f"\n## V sweep, csd-SS, tokens={tokens}\n| V | ours ms | Megatron CE ms | ours / CE | time / time at V={sweep[0]} |\n|---|---|---|---|---|")
        first = None
        for v in sweep:
            s, t, y = make_inputs(tokens, v)
            times, ratios = interleaved_times(("megatron_ce", "ours"), s, t, y, OBJECTIVES["csd-SS"], args.repeats)
            first = first or times["ours"]
            print(f"| {v} | {times['ours'] * 1e3:.0f} | {times['megatron_ce'] * 1e3:.0f} | {ratios['ours']:.2f} |"
                  f" {times['ours'] / first:.2f} |", flush=True)
    print("# load: " + uptime())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
