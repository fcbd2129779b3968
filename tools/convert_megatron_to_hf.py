#!/usr/bin/env python
"""Export a megatron_csd model checkpoint (converted, or written by the trainer at any TP/PP)
to an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads:

    python tools/convert_megatron_to_hf.py --load runs/distill/checkpoints --out gemma-2b-distilled

--load takes a trainer save dir (OUTPUT_DIR/checkpoints: its latest iteration), one iter_* folder
or a converted model checkpoint. Vocabulary padding is removed; tokenizer files are copied from
--load (or --tokenizer-dir), and a sentencepiece tokenizer.model also gets a tokenizer.json, so
AutoTokenizer loads the folder with the hf extra (pip install -e '.[hf]').
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="model checkpoint folder (model_config.json + "
                        "model/), trainer iter_* folder or trainer save dir (its latest)")
    parser.add_argument("--out", required=True, help="HF output folder (must be new or empty)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="dtype of the exported weights (default: as stored)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="copy the tokenizer files from this folder instead of --load")
    parser.add_argument("--max-shard-size-gb", type=float, default=2.0, help="safetensors shard size")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, replacing only files the exporter writes")
    parser.add_argument("--no-verify-checkpoint", action="store_true",
                        help="read --load without checking its manifest.json (at your own risk)")
    args = parser.parse_args(argv)
    import torch

    from megatron_csd.training.warning_filters import install_known_warning_filters

    install_known_warning_filters(cpu_run=not torch.cuda.is_available())  # upstream noise only

    from megatron_csd.conversion.megatron_to_hf import convert_megatron_to_hf

    try:
        config = convert_megatron_to_hf(args.load, args.out, dtype=args.dtype, force=args.force,
                                        tokenizer_dir=args.tokenizer_dir,
                                        max_shard_bytes=int(args.max_shard_size_gb * 1024 ** 3),
                                        verify=not args.no_verify_checkpoint)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.load} -> {args.out} ({config['architectures'][0]}, dtype {config['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
