#!/usr/bin/env python
"""Greedy generation throughput on CPU: megatron_csd.generation vs transformers' generate.

Same HF model (a random one built from a config, or --hf-dir), converted to Megatron; same
prompts (random ids, equal length, so neither side pads), same batch, greedy, no eos, fixed
number of new tokens. Prints the machine load (`uptime`), tokens/s of both and the ratio,
and whether the greedy tokens agree. One process (TP 1); the median of --repeats runs.

    OMP_NUM_THREADS=2 python tools/bench_generation.py --batch-size 8 --prompt-length 64 --max-new-tokens 64
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _hf_model(args, directory: Path):
    import torch
    import transformers

    if args.hf_dir:
        return transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval(), args.hf_dir
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.num_layers, num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory / "hf")
    return model, str(directory / "hf")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", default=None, help="an HF model folder (default: a random LLaMA)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from megatron_csd.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_csd.generation import GenerationRequest, SamplingParams, generate, load_for_generation
    from megatron_csd.parallel.initialize import initialize_parallel

    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, hf_dir = _hf_model(args, Path(tmp))
        convert_hf_to_megatron(hf_dir, Path(tmp) / "mg")
        initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
        print(f"threads: {torch.get_num_threads()}")
        model, cfg, _ = load_for_generation(str(Path(tmp) / "mg"))
        generator = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, cfg.vocab_size, (args.batch_size, args.prompt_length), generator=generator)
        requests = [GenerationRequest(row.tolist()) for row in prompts]
        params = SamplingParams(greedy=True, max_new_tokens=args.max_new_tokens)
        new_tokens = args.batch_size * args.max_new_tokens
        ours, theirs = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results = generate(model, requests, params, vocab_size=cfg.vocab_size,
                               max_batch_size=args.batch_size)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                output = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                           max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                                           eos_token_id=None, pad_token_id=0)
            theirs.append(time.perf_counter() - start)
        agree = sum(r.completion_ids == row.tolist()
                    for r, row in zip(results, output[:, args.prompt_length:]))
    ours_tps, theirs_tps = new_tokens / statistics.median(ours), new_tokens / statistics.median(theirs)
    print(f"model: {cfg.family}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}; "
          f"batch {args.batch_size}, prompt {args.prompt_length}, new tokens {args.max_new_tokens}, "
          f"median of {args.repeats}")
    print(f"megatron_csd.generation: {ours_tps:8.1f} tokens/s")
    print(f"transformers generate:   {theirs_tps:8.1f} tokens/s")
    print(f"ratio (ours / transformers): {ours_tps / theirs_tps:.2f}")
    print(f"greedy completions identical: {agree}/{args.batch_size}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":  # guard: dist_checkpointing may spawn helper processes
    sys.exit(main())
