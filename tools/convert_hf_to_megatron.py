#!/usr/bin/env python
"""Convert an HF checkpoint (Gemma, LLaMA/OpenLLaMA/Mistral-style, GPT-2) to a megatron_csd
model checkpoint that loads at any TP/PP:

    python tools/convert_hf_to_megatron.py --hf-dir gemma-7b-it --out ckpt/gemma-7b-it --tp 2 --pp 1

Streams one tensor at a time (peak RAM ~ the largest layer tensor, not the model).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty)")
    parser.add_argument("--tp", "--tensor-model-parallel-size", type=int, default=1, dest="tp",
                        help="TP the checkpoint is meant for; checked, the checkpoint loads at any TP")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", type=int, default=1, dest="pp",
                        help="PP the checkpoint is meant for; checked, the checkpoint loads at any PP")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="stored dtype (default: the HF config's dtype)")
    parser.add_argument("--vocab-multiple", type=int, default=1024,
                        help="pad the vocabulary to a multiple of this (default 1024 = any TP <= 8)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, replacing only files the converter writes")
    args = parser.parse_args(argv)
    import torch

    from megatron_csd.training.warning_filters import install_known_warning_filters

    install_known_warning_filters(cpu_run=not torch.cuda.is_available())  # upstream noise only

    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron

    start = time.time()
    try:
        cfg = convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                     force=args.force, vocab_multiple=args.vocab_multiple)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.hf_dir} ({cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size} padded to {cfg.padded_vocab_size}) -> {args.out} "
          f"in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":  # required: dist_checkpointing may spawn helper processes
    sys.exit(main())
