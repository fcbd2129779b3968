"""Load a checkpoint for generation at the current TP/PP layout.

``load`` may be a converted model folder (tools/convert_hf_to_megatron.py), a trainer save
directory (its ``latest`` iteration) or one ``iter_*`` folder: each holds model_config.json +
model/ (models.checkpoint layout), which loads at any TP/PP. The tokenizer is the folder's own
(tokenizer.model / tokenizer.json), or ``tokenizer`` when given, or None.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoadedModel(NamedTuple):
    model: object            # GPTModel (this rank's TP/PP shard), eval mode
    model_config: object     # models.ModelConfig
    tokenizer: Optional[object]


def find_tokenizer(directory: str, tokenizer: Optional[str] = None):
    """`tokenizer` loaded when given, else the checkpoint's own tokenizer files, else None."""
    from megatron_csd.data import load_tokenizer

    if tokenizer is not None:
        try:
            return load_tokenizer(tokenizer)
        except FileNotFoundError as err:
            raise ValueError(f"--tokenizer: {err}") from None
    for name in ("tokenizer.model", "tokenizer.json"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            try:
                return load_tokenizer(path)
            except Exception as err:  # a placeholder or corrupt file: say which one
                raise ValueError(f"the checkpoint's tokenizer {path} cannot be loaded ({err}); "
                                 "pass --tokenizer") from None
    return None


def load_for_generation(load: str, *, precision: str = "fp32", tokenizer: Optional[str] = None,
                        load_tokenizer: bool = True) -> LoadedModel:
    """Build this rank's GPTModel shard for the current parallel_state and load `load` into it.

    Collective: every rank calls it after parallel_state is initialised (e.g. by
    megatron_csd.parallel.initialize_parallel, which also picks the device: the model is built
    where Megatron builds it, on the GPU of this rank or, in CPU mode, on the CPU).
    Returns (model, model_config, tokenizer-or-None). ValueError for a folder that is not a
    checkpoint.
    """
    from megatron.core import parallel_state

    from megatron_csd.models import build_gpt_model
    from megatron_csd.models.checkpoint import load_model, load_model_config, resolve_model_checkpoint

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if not os.path.isdir(load):
        raise ValueError(f"--load {load!r} is not a directory (expected a converted model, a "
                         "trainer save directory or an iter_* folder)")
    directory = str(resolve_model_checkpoint(load))
    cfg = load_model_config(directory)
    model = build_gpt_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage(),
                            params_dtype=PRECISIONS[precision], perform_initialization=False)
    load_model(model, directory)
    model.eval()
    tok = find_tokenizer(directory, tokenizer) if load_tokenizer else None
    return LoadedModel(model, cfg, tok)
