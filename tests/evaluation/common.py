"""Shared builders for the evaluation tests (this module holds no tests).

A workspace is the toy instruction data (``megatron_csd.data.toy``: 16 held-out records and a
512-piece sentencepiece tokenizer, so the model's vocabulary is padded to 1024 columns) and a
tiny Gemma model checkpoint written at TP1/PP1 with the tokenizer beside it, as the converter
writes one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def build_eval_workspace(root) -> dict:
    from megatron_csd.data.toy import build_toy_data

    root = Path(root)
    paths = build_toy_data(root / "toy", num_train=64, num_valid=16, vocab_size=512)
    return {"root": str(root), "tokenizer": str(paths["tokenizer"]), "valid": str(paths["valid"]),
            "train": str(paths["train"]), "model": str(root / "model")}


def save_tiny_model(rank, world_size, workspace: dict, seed: int = 3) -> None:
    """Write the tiny Gemma checkpoint (spawned 1-process world)."""
    from megatron_csd.data import load_tokenizer
    from megatron_csd.models import build_gpt_model, get_preset
    from megatron_csd.models.checkpoint import save_model
    from megatron_csd.parallel.initialize import destroy_parallel, initialize_parallel

    tokenizer = load_tokenizer(workspace["tokenizer"])
    initialize_parallel(device="cpu", tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=seed)
    cfg = get_preset("tiny-gemma").replace(vocab_size=tokenizer.vocab_size)
    save_model(build_gpt_model(cfg), workspace["model"], cfg)
    shutil.copy(workspace["tokenizer"], os.path.join(workspace["model"], "tokenizer.model"))
    destroy_parallel()


def fake_generate(prompts: list, seeds: list) -> list:
    """A deterministic stand-in for generation: a slice of the prompt chosen by the seed.

    The answer also depends on the batch size, so results agree across DP sizes only if every
    batch holds the same requests whatever the layout (what the runner promises).
    """
    out = []
    for prompt, seed in zip(prompts, seeds):
        start = seed % max(len(prompt) - 1, 1)
        length = 1 + (seed + len(prompts)) % 6
        out.append((list(prompt[start:start + length]), "length"))
    return out
