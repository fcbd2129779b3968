#!/usr/bin/env python
"""Check a converted checkpoint against the HF original: same random token ids through
transformers and through the Megatron model, print the max |logit difference| and the mean
per-token KL(p_hf || p_megatron).

    python tools/check_conversion.py --hf-dir gemma-2b --megatron-dir ckpt/gemma-2b
    torchrun --nproc-per-node 2 tools/check_conversion.py --hf-dir ... --megatron-dir ... --tp 2

Needs the hf extra (pip install -e '.[hf]': transformers). Uses the GPU when there is one
(CPU/gloo otherwise). Exits 1 if --max-diff / --max-kl is exceeded.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from megatron_csd.parallel.launcher_guard import die_with_launcher

    die_with_launcher()  # under torchrun: exit when torchrun dies
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--megatron-dir", required=True,
                        help="model checkpoint, trainer iter_* folder or trainer save dir (its latest)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--max-diff", type=float, default=None, help="fail above this max |diff|")
    parser.add_argument("--max-kl", type=float, default=None, help="fail above this mean KL")
    parser.add_argument("--no-verify-checkpoint", action="store_true",
                        help="load --megatron-dir without checking its manifest.json (at your own risk)")
    args = parser.parse_args(argv)
    try:
        import transformers  # noqa: F401  (the reference side of the check)
    except ImportError:
        print("error: tools/check_conversion.py needs transformers; install the hf extra: "
              "pip install -e '.[hf]'", file=sys.stderr)
        return 2
    import tempfile

    import torch
    import torch.distributed as dist

    from megatron_csd.training.warning_filters import install_known_warning_filters

    install_known_warning_filters(cpu_run=not torch.cuda.is_available())  # upstream noise only

    from megatron_csd.conversion.verify import check_conversion

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp * args.pp > world or world % (args.tp * args.pp):
        print(f"error: TP*PP = {args.tp * args.pp} must divide the number of processes ({world}); "
              "launch with torchrun --nproc-per-node N", file=sys.stderr)
        return 2
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group(backend)
    else:
        store_dir = tempfile.mkdtemp(prefix="check_conversion_")
        dist.init_process_group(backend, store=dist.FileStore(f"{store_dir}/store", 1), rank=0, world_size=1)
    try:
        result = check_conversion(args.hf_dir, args.megatron_dir, tp=args.tp, pp=args.pp,
                                  batch=args.batch, seq_len=args.seq_len, seed=args.seed, dtype=args.dtype,
                                  verify=not args.no_verify_checkpoint)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    if result is None:
        return 0
    print(json.dumps(result._asdict()))
    print(f"max |logit diff| = {result.max_abs_diff:.3e} (max |logit| {result.max_abs_logit:.2f}), "
          f"mean KL(hf || megatron) = {result.mean_kl:.3e}")
    failed = ((args.max_diff is not None and result.max_abs_diff > args.max_diff)
              or (args.max_kl is not None and result.mean_kl > args.max_kl))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
