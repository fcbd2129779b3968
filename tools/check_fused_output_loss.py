#!/usr/bin/env python
"""GPU check of the fused output layer + loss at Gemma-2B width (h 2048, V 256000), bf16.

    python tools/check_fused_output_loss.py --json fused_gpu.json               # one GPU, TP 1
    torchrun --nproc-per-node 2 tools/check_fused_output_loss.py --json F       # TP 2 (NCCL)

Per path (unfused: full ``[tokens, V/TP]`` logits and objective.loss_func; fused: token chunks)
one forward + backward of the student's and the teacher's output layers and the loss, as
tools/bench_fused.py does on CPU: peak CUDA memory above the inputs
(``torch.cuda.max_memory_allocated``), median time over ``--repeats`` runs after a warm-up
(synchronised), and parity of the loss, dH and dW between the paths (bf16: norm-relative
error). With transformer-engine installed it also builds a tiny TE-spec GPTModel and checks that
the captured hidden states and output weight reproduce the model's own logits (the output
layer of Megatron's GPTModel is a ColumnParallelLinear with both layer specs).
Writes ``unfused_peak_mb``, ``fused_peak_mb``, ``unfused_ms``, ``fused_ms`` (rank 0) to --json.
Exit codes: 0 ok, 1 a check failed, 2 no CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _measure(step, repeats):
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return result, peak / 2**20, statistics.median(times) * 1e3


def _relative_error(got, want) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _check_te_capture() -> dict:
    """Tiny TE-spec GPTModel: captured hidden @ W^T equals the model's logits (bf16)."""
    import torch

    from megatron_csd.models import build_gpt_model, get_preset
    from megatron_csd.models.builder import transformer_engine_available
    from megatron_csd.models.output_capture import OutputCapture

    if not transformer_engine_available():
        return {"te_capture": "skipped (transformer-engine not installed)"}
    cfg = get_preset("tiny-gemma")
    model = build_gpt_model(cfg, use_te=True, params_dtype=torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda")
    positions = torch.arange(16, device="cuda").expand(2, 16)
    with torch.no_grad():
        logits = model(tokens, positions, None)
        capture = OutputCapture(model)
        model(tokens, positions, None)
        heads = capture.take()
        fused_logits = torch.matmul(heads.hidden, heads.weight.t()).transpose(0, 1)
    error = _relative_error(fused_logits, logits)
    return {"te_capture_rel_error": error, "te_capture_ok": error < 1e-2}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--objective", default="csd-SS")
    parser.add_argument("--kd-ratio", type=float, default=1.0)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-rel-error", type=float, default=2e-2, help="dH / dW norm-relative error allowed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("error: tools/check_fused_output_loss.py needs a CUDA GPU; on CPU run "
              "python tools/bench_loss.py --fused (the CPU benchmark)", file=sys.stderr)
        return 2
    from megatron.core import parallel_state

    from bench_fused import make_inputs, make_spec, make_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1:
        import tempfile
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="check_fused_"), "store"), 1)
        dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    else:
        dist.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    spec = make_spec(args, group, rank, world)
    inputs = make_inputs(args, rank, world, device="cuda", dtype=dtype)
    out = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "tp": world, "dtype": args.dtype,
           "objective": args.objective, "device": torch.cuda.get_device_name(),
           "buffer_mb": args.tokens * (args.vocab // world) * 4 / 2**20}
    results = {}
    for path in ("unfused", "fused"):
        results[path], out[f"{path}_peak_mb"], out[f"{path}_ms"] = _measure(
            make_step(path, *inputs, spec, group), args.repeats)
        torch.cuda.empty_cache()
    out["peak_ratio"] = out["fused_peak_mb"] / out["unfused_peak_mb"]
    out["time_ratio"] = out["fused_ms"] / out["unfused_ms"]
    (loss_u, dh_u, dw_u), (loss_f, dh_f, dw_f) = results["unfused"], results["fused"]
    out["loss_rel_error"] = abs(float(loss_f) - float(loss_u)) / max(abs(float(loss_u)), 1e-30)
    out["dh_rel_error"] = _relative_error(dh_f, dh_u)
    out["dw_rel_error"] = _relative_error(dw_f, dw_u)
    ok = max(out["loss_rel_error"], out["dh_rel_error"], out["dw_rel_error"]) <= args.max_rel_error
    out.update(_check_te_capture())  # every rank: the tiny model is TP-sharded too
    ok = ok and out.get("te_capture_ok", True)
    out["ok"] = ok
    if rank == 0:
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(out, handle, indent=2)
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
