"""``python -m megatron_csd.evaluation`` (and ``tools/evaluate.py``): evaluate a checkpoint.

    torchrun --nproc-per-node 4 -m megatron_csd.evaluation --load runs/distill/checkpoints \
        --test-file dolly=data/dolly_test.jsonl --test-file vicuna=data/vicuna.jsonl \
        --tensor-model-parallel-size 2 --output-dir eval/distill

Prints a table (rank 0), writes OUTPUT_DIR/results.json and OUTPUT_DIR/generations_<name>.jsonl;
refuses an output dir that already holds those files. Bad input is a one-line ``error:``.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_csd.evaluation.settings import PAPER_SEEDS, EvalSettings, TestFile


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_csd.evaluation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--load", required=True, help="converted model dir, trainer save dir (its latest) or iter_* dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json (default: the checkpoint's)")
    p.add_argument("--template", default="dolly", help="prompt template: dolly | gemma-chat (default dolly)")
    p.add_argument("--test-file", action="append", required=True, metavar="NAME=PATH",
                   help="named Dolly-format JSONL test file (repeatable; PATH alone: NAME = file stem)")
    p.add_argument("--fields", default="dolly", help="JSON keys: dolly | alpaca | instruction=K,context=K,response=K")
    p.add_argument("--output-dir", required=True, help="results.json + generations_<name>.jsonl (must not hold earlier results)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(PAPER_SEEDS), help="generation seeds (default 10 20 30 40 50)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=None, help="cut longer prompts' instruction/context")
    p.add_argument("--max-seq-length", type=int, default=None, help="teacher-forced loss: truncate samples to this")
    p.add_argument("--num-samples", type=int, default=0, help="first N records per file (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch / loss micro batch")
    p.add_argument("--eos-id", type=int, default=None, help="stop token (default: the tokenizer's eos)")
    p.add_argument("--no-response-loss", action="store_true", help="skip the teacher-forced loss")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--precision", default="auto", help="fp32 | bf16 | fp16 | auto (bf16 on cuda, fp32 on cpu)")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def settings_from_args(args) -> EvalSettings:
    return EvalSettings(
        seeds=tuple(args.seeds), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        greedy=args.greedy, max_new_tokens=args.max_new_tokens,
        max_prompt_length=args.max_prompt_length, max_seq_length=args.max_seq_length,
        num_samples=args.num_samples, batch_size=args.batch_size, template=args.template,
        eos_id=args.eos_id, response_loss=not args.no_response_loss, fields=args.fields)


def _precision(precision: str, device: str) -> str:
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16, fp16 or auto, got {precision!r}")
    return precision


def _check_tokenizer(tokenizer, model_config, directory: str) -> None:
    if tokenizer is None:
        raise ValueError(f"{directory} holds no tokenizer (tokenizer.model / tokenizer.json); "
                         "pass --tokenizer PATH")
    # Fewer tokenizer ids than model rows is normal (Qwen2.5: 151936 rows, ~151665 ids): the
    # response loss runs over all model rows, generation samples only decodable ids.
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model has only "
                         f"{model_config.vocab_size} vocabulary rows: use the model's own tokenizer")


def run(args) -> int:
    from megatron_csd.generation import load_for_generation
    from megatron_csd.evaluation.report import check_output_dir, format_table, write_results
    from megatron_csd.evaluation.runner import evaluate
    from megatron_csd.evaluation.settings import check_test_files
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel, resolve_device

    settings = settings_from_args(args)
    test_files = check_test_files([TestFile.parse(spec) for spec in args.test_file])
    check_output_dir(args.output_dir, [f.name for f in test_files])
    device = resolve_device(args.device)
    precision = _precision(args.precision, device)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tensor x pipeline parallel size "
                         f"{tp} x {pp}; launch a multiple of {tp * pp} processes")
    ctx = initialize_parallel(device=device, tensor_model_parallel_size=tp,
                              pipeline_model_parallel_size=pp, seed=settings.seeds[0])
    try:
        from megatron_csd.models.checkpoint import resolve_model_checkpoint

        model, model_config, tokenizer = load_for_generation(args.load, precision=precision,
                                                             tokenizer=args.tokenizer)
        directory = str(resolve_model_checkpoint(args.load))
        _check_tokenizer(tokenizer, model_config, directory)
        result = evaluate(model, test_files, tokenizer, settings, ctx, vocab_size=model_config.vocab_size,
                          show_progress=not args.quiet)
        if ctx.rank == 0:
            written = write_results(result, args.output_dir)
            print(f"[evaluate] {directory} (TP {ctx.tp_size}, PP {ctx.pp_size}, DP {ctx.dp_size})")
            print(format_table(result))
            print("[evaluate] wrote " + ", ".join(written), flush=True)
    finally:
        destroy_parallel()
    return 0


def main(argv=None) -> int:
    from megatron_csd.generation.errors import GenerationError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 2
    except GenerationError as err:  # NaN logits: a damaged or diverged checkpoint, status 1
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        return 1
