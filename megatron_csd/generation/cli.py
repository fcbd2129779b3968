"""``tools/generate.py``: generate completions for a JSONL file (under torchrun for > 1 rank).

    python tools/generate.py --load CKPT --input IN.jsonl --output OUT.jsonl [--tokenizer TOK]
        [--template dolly] [--greedy | --temperature T --top-k K --top-p P --seed S]
        --max-new-tokens N [--eos-id ID] --device cpu|cuda
        --tensor-model-parallel-size N --pipeline-model-parallel-size N

World size = TP x PP x DP; data-parallel replicas split the requests and global rank 0 writes
OUT.jsonl (a new file: an existing one is refused). Output lines: the input's fields plus
``completion_ids`` (without the stopping eos), ``finish_reason`` and ``completion`` (text,
when a tokenizer is known). Bad input exits with status 2 and a one-line message; NaN logits
(a damaged or diverged checkpoint) exit with status 1 and one line, on every rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="converted model dir, trainer save dir (uses latest) or iter_* dir")
    parser.add_argument("--input", required=True, help="JSONL: Dolly fields, prompt or prompt_ids")
    parser.add_argument("--output", required=True, help="JSONL to write (must not exist)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model / tokenizer.json / folder (default: the checkpoint's)")
    parser.add_argument("--template", default="dolly", help="prompt template for Dolly lines")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding")
    parser.add_argument("--temperature", type=float, default=None, help="default 1.0")
    parser.add_argument("--top-k", type=int, default=None, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=None, help="1.0 = off (default)")
    parser.add_argument("--seed", type=int, default=None,
                        help="request i uses seed S + i unless its line has a `seed` (default 0)")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--eos-id", type=int, default=None,
                        help="stop token (default: the tokenizer's eos; none without a tokenizer)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string (repeatable; needs a tokenizer)")
    parser.add_argument("--allow-undecodable-ids", action="store_true",
                        help="also sample model ids >= the tokenizer's size (masked by default)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return parser


def sampling_params_from_args(args, *, tokenizer, vocab_size: int):
    """SamplingParams for the parsed flags (ValueError on a conflicting or bad value)."""
    from megatron_csd.generation.params import SamplingParams

    given = [f"--{name.replace('_', '-')}" for name in _SAMPLING_FLAGS if getattr(args, name) is not None]
    if args.greedy and given:
        raise ValueError(f"--greedy cannot be combined with {', '.join(given)}")
    eos_id = args.eos_id if args.eos_id is not None else getattr(tokenizer, "eos_id", None)
    decodable = None
    if tokenizer is not None:
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                             f"{vocab_size} rows: wrong tokenizer for this model")
        decodable = None if args.allow_undecodable_ids else tokenizer.vocab_size
    if args.stop and tokenizer is None:
        raise ValueError("--stop needs a tokenizer (pass --tokenizer)")
    return SamplingParams(
        greedy=args.greedy,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=0 if args.top_k is None else args.top_k,
        top_p=1.0 if args.top_p is None else args.top_p,
        max_new_tokens=args.max_new_tokens, eos_id=eos_id, stop_strings=tuple(args.stop),
        decodable_vocab_size=decodable)


def _check_args(args) -> None:
    from megatron_csd.data.templates import check_template

    check_template(args.template)
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "max_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input} is not a file")
    if os.path.exists(args.output):
        raise ValueError(f"--output {args.output} already exists; choose a new path (it is "
                         "never overwritten)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(f"world size {world} is not a multiple of TP x PP = {model_parallel} "
                         "(launch with torchrun --nproc-per-node TP*PP*DP)")


def _write_jsonl(path: str, records, results) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        for record, result in zip(records, results):
            line = dict(record, completion_ids=result.completion_ids,
                        finish_reason=result.finish_reason)
            if result.completion is not None:
                line["completion"] = result.completion
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run(args) -> int:
    import torch.distributed as dist

    from megatron_csd.generation.engine import check_requests, generate
    from megatron_csd.generation.errors import GenerationError
    from megatron_csd.generation.inputs import read_requests
    from megatron_csd.generation.loading import find_tokenizer, load_for_generation
    from megatron_csd.models.builder import check_parallel_compatible
    from megatron_csd.models.checkpoint import load_model_config, resolve_model_checkpoint
    from megatron_csd.parallel.initialize import initialize_parallel, resolve_device

    _check_args(args)
    if not os.path.isdir(args.load):
        raise ValueError(f"--load {args.load} is not a directory (a converted model, a trainer "
                         "save dir or an iter_* dir)")
    # Everything the user can get wrong is checked before the process group and the model.
    directory = str(resolve_model_checkpoint(args.load))
    cfg = load_model_config(directory)
    check_parallel_compatible(cfg, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    tokenizer = find_tokenizer(directory, args.tokenizer)
    params = sampling_params_from_args(args, tokenizer=tokenizer, vocab_size=cfg.vocab_size)
    records, requests = read_requests(args.input, tokenizer=tokenizer, template=args.template,
                                      base_seed=args.seed or 0)
    check_requests(requests, params, vocab_size=cfg.vocab_size, max_positions=cfg.max_position_embeddings)
    ctx = initialize_parallel(device=resolve_device(args.device),
                              tensor_model_parallel_size=args.tensor_model_parallel_size,
                              pipeline_model_parallel_size=args.pipeline_model_parallel_size, seed=0)
    loaded = load_for_generation(directory, precision=args.precision, load_tokenizer=False)
    # Data-parallel replicas take contiguous slices; rank 0 collects them in order.
    per_replica = -(-len(requests) // ctx.dp_size)
    mine = requests[ctx.dp_rank * per_replica:(ctx.dp_rank + 1) * per_replica]
    failure = None  # a GenerationError reaches every replica through the gather below
    try:
        results = generate(loaded.model, mine, params, vocab_size=cfg.vocab_size,
                           tokenizer=tokenizer, max_batch_size=args.max_batch_size) if mine else []
    except GenerationError as err:
        where = f"data-parallel replica {ctx.dp_rank} (its own request order): " if ctx.dp_size > 1 else ""
        results, failure = [], f"{where}{err}"
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, (ctx.dp_rank, ctx.tp_rank, ctx.pp_rank, results, failure))
    failures = [g[4] for g in gathered if g[4] is not None]
    if failures:
        raise GenerationError(failures[0])
    if ctx.rank == 0:
        ordered = [r for dp, tp, pp, part, _ in sorted(gathered, key=lambda g: g[0])
                   if tp == 0 and pp == 0 for r in part]
        _write_jsonl(args.output, records, ordered)
        print(f"generated {len(ordered)} completions -> {args.output}")
    dist.barrier()
    return 0


def main(argv=None) -> int:
    from megatron_csd.generation.errors import GenerationError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    except GenerationError as err:  # raised on every rank; one line from global rank 0
        if os.environ.get("RANK", "0") == "0":
            print(f"generate.py: error: {err}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
