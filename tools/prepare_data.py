#!/usr/bin/env python3
"""Tokenize instruction JSONL once for training (thin CLI over megatron_csd.data.prepare).

    python tools/prepare_data.py --input train.jsonl --tokenizer TOKENIZER --out DIR \\
        --seq-length 512 --template dolly [--valid-input valid.jsonl | --valid-fraction 0.05]

Writes DIR/train/ (and DIR/valid/) for `InstructionDataset(DIR/train, seq_length)`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_csd.data.prepare import prepare_dataset  # noqa: E402
from megatron_csd.data.records import FieldMap  # noqa: E402
from megatron_csd.data.templates import TEMPLATE_NAMES  # noqa: E402
from megatron_csd.data.tokenizer import load_tokenizer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="training JSONL file")
    parser.add_argument("--tokenizer", required=True,
                        help="tokenizer.model / tokenizer.json, or a directory holding one "
                             "(e.g. the converted checkpoint)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seq-length", type=int, required=True,
                        help="training sequence length; samples keep at most seq-length + 1 ids")
    parser.add_argument("--template", choices=TEMPLATE_NAMES, default="dolly",
                        help="prompt template: dolly (Alpaca-style) or gemma-chat (-IT models)")
    parser.add_argument("--valid-input", default=None, help="separate validation JSONL file")
    parser.add_argument("--valid-fraction", type=float, default=0.0,
                        help="hold out this fraction of --input as validation (exact, seeded)")
    parser.add_argument("--split-seed", type=int, default=1234)
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="cut prompts (instruction/context part) to this many tokens")
    parser.add_argument("--fields", default="dolly",
                        help="JSON keys: 'dolly' (instruction/context/response), 'alpaca' "
                             "(instruction/input/output) or 'instruction=K,context=K,response=K'")
    parser.add_argument("--skip-malformed", action="store_true",
                        help="skip and count malformed lines instead of stopping at the first")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


class _Progress:
    """Prints `file: NN% (MB)` to stderr at most twice a second."""

    def __init__(self, quiet: bool):
        self.quiet, self.last, self.finished = quiet, 0.0, set()

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.time()
        if self.quiet or name in self.finished or (now - self.last < 0.5 and done < total):
            return
        if done >= total:
            self.finished.add(name)
        self.last = now
        percent = 100.0 * done / total if total else 100.0
        end = "\n" if done >= total else ""
        print(f"\r{name}: {percent:5.1f}% ({done / 2**20:.1f} MiB)", end=end, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        result = prepare_dataset(
            args.input, tokenizer, args.out, seq_length=args.seq_length, template=args.template,
            valid_input=args.valid_input, valid_fraction=args.valid_fraction,
            split_seed=args.split_seed, max_prompt_length=args.max_prompt_length,
            fields=FieldMap.parse(args.fields), skip_malformed=args.skip_malformed,
            on_progress=_Progress(args.quiet))
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for source, stats in result.read_stats.items():
        if stats["num_malformed"]:
            print(f"warning: skipped {stats['num_malformed']} malformed lines in {source}, e.g.\n  "
                  + "\n  ".join(stats["first_errors"][:3]), file=sys.stderr)
    for name, meta in result.splits.items():
        print(f"{Path(args.out) / name}: {meta['num_samples']} samples, {meta['num_tokens']} tokens, "
              f"{meta['num_loss_tokens']} loss tokens, {meta['num_prompt_truncated']} prompts and "
              f"{meta['num_response_truncated']} responses truncated")
    print(f"done in {time.time() - start:.1f}s (tokenizer fingerprint {tokenizer.fingerprint[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
