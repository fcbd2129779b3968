#!/usr/bin/env python
"""Compare an FP8 teacher with the same teacher in bf16 (GPU + transformer-engine only):
max |logit diff|, KL(bf16 || fp8), and the CSD loss of a bf16 student against each.

    python tools/check_fp8_teacher.py                                   # tiny random models
    python tools/check_fp8_teacher.py --teacher-dir ckpt/gemma-7b-it --student-dir ckpt/gemma-2b \\
        --seq-len 512 --batch 2

Prints one JSON line. Exits 1 if FP8 was silently not applied (bitwise equal logits) or the
thresholds --max-kl / --max-rel-loss-diff are exceeded.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-dir", default=None, help="teacher model checkpoint (default: random tiny-gemma)")
    parser.add_argument("--student-dir", default=None, help="student model checkpoint (default: random tiny-gemma)")
    parser.add_argument("--fp8", choices=("e4m3", "hybrid"), default="hybrid")
    parser.add_argument("--fp8-recipe", choices=("delayed", "tensorwise", "mxfp8", "blockwise"), default="delayed")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-kl", type=float, default=None)
    parser.add_argument("--max-rel-loss-diff", type=float, default=None)
    args = parser.parse_args(argv)
    import torch

    from megatron_csd.training.warning_filters import install_known_warning_filters

    install_known_warning_filters(cpu_run=not torch.cuda.is_available())  # upstream noise only

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_csd.models import get_preset
    from megatron_csd.models.checkpoint import load_model_config
    from megatron_csd.models.fp8_check import compare_fp8_teacher
    from megatron_csd.parallel.cpu_mode import seed_model_parallel_rng

    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU (and transformer-engine)", file=sys.stderr)
        return 2
    teacher_cfg = load_model_config(args.teacher_dir) if args.teacher_dir else get_preset("tiny-gemma")
    student_cfg = load_model_config(args.student_dir) if args.student_dir else get_preset("tiny-gemma")
    torch.cuda.set_device(0)
    store_dir = tempfile.mkdtemp(prefix="check_fp8_")
    dist.init_process_group("nccl", store=dist.FileStore(f"{store_dir}/store", 1), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        seed_model_parallel_rng(args.seed)
        result = compare_fp8_teacher(teacher_cfg, student_cfg, fp8=args.fp8, fp8_recipe=args.fp8_recipe,
                                     teacher_dir=args.teacher_dir, student_dir=args.student_dir,
                                     batch=args.batch, seq_len=args.seq_len, seed=args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    print(json.dumps(result._asdict()))
    failed = (result.logits_identical
              or (args.max_kl is not None and result.mean_kl_bf16_fp8 > args.max_kl)
              or (args.max_rel_loss_diff is not None and result.relative_loss_diff > args.max_rel_loss_diff))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
