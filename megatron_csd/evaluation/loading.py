"""Load the model to evaluate at this run's TP / PP: converted dir, trainer save dir or iter_*.

Interim loader until ``megatron_csd.generation`` provides its own (the two must agree):
``resolve_model_checkpoint`` follows a save dir's ``latest``; the GPTModel stage of this rank
is built from ``model_config.json`` and loaded with ``models.checkpoint.load_model``. The
tokenizer is ``tokenizer`` when given, else the one stored in the checkpoint folder.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_tokenizer(checkpoint_dir: str, tokenizer: Optional[str]):
    from megatron_csd.data import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    for name in _TOKENIZER_FILES:
        path = os.path.join(checkpoint_dir, name)
        if os.path.isfile(path):
            return load_tokenizer(path)
    raise ValueError(f"{checkpoint_dir} holds no tokenizer ({' or '.join(_TOKENIZER_FILES)}); "
                     "pass --tokenizer PATH")


def load_model_for_eval(load: str, ctx, *, tokenizer: Optional[str], precision: str):
    """(GPTModel stage in eval mode, ModelConfig, tokenizer, checkpoint dir) for this rank."""
    from megatron_csd.models import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, load_model_config, resolve_model_checkpoint

    if not os.path.isdir(load):
        raise ValueError(f"--load {load} is not a directory (a converted model, a trainer save "
                         "dir or one of its iter_* folders)")
    directory = str(resolve_model_checkpoint(load))
    cfg = load_model_config(directory)
    tok = find_tokenizer(directory, tokenizer)
    if cfg.vocab_size < tok.vocab_size or cfg.vocab_size - tok.vocab_size > 1024:
        raise ValueError(f"the model embeds {cfg.vocab_size} tokens but the tokenizer has "
                         f"{tok.vocab_size}: use the model's own tokenizer")
    model = build_gpt_model(cfg, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage,
                            params_dtype=PRECISIONS[precision])
    load_model(model, directory)
    model.eval()
    return model, cfg, tok, directory
