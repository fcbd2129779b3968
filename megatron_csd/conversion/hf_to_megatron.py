"""HF checkpoint folder -> megatron_csd model checkpoint (model_config.json + model/), streaming.

Steps: read config.json and pick the family (`hf_config`), pad the vocabulary to a multiple of
1024 (serves TP 1..8, not tied to the TP given here), check every HF tensor name and shape
against the architecture before writing anything, then write Megatron's dist checkpoint one
tensor chunk at a time (`streaming_save`), each chunk computed from its HF tensors by the
pure rules of `mapping`. Output goes to a temp folder renamed into place at the end.

Only metadata of the whole model is ever held; peak memory is about the largest layer tensor
(plus its HF sources), so a 7B model converts on a machine with less RAM than the model.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_csd.conversion.hf_config import hf_config_to_model_config
from megatron_csd.conversion.hf_reader import HFCheckpointReader, read_hf_config
from megatron_csd.conversion.mapping import (
    LAYER_PREFIX,
    conversion_rules,
    hf_prefix_for,
    ignorable_hf_names,
)
from megatron_csd.conversion.output_dir import atomic_output_dir, check_output_dir
from megatron_csd.conversion.process_group import single_process_model_parallel
from megatron_csd.models.builder import check_parallel_compatible
from megatron_csd.models.checkpoint import (
    HF_CONFIG_COPY,
    HF_SIDE_FILES,
    MODEL_SUBDIR,
    copy_side_files,
    write_model_config,
)
from megatron_csd.models.config import ModelConfig
from megatron_csd.parallel.vocab import DEFAULT_VOCAB_MULTIPLE, padded_vocab_size

PathLike = Union[str, os.PathLike]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: Optional[str], hf_config: dict, fallback: torch.dtype) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    declared = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    if fallback not in DTYPES.values():
        raise ValueError(f"checkpoint tensors are {fallback}; pass --dtype float32|bfloat16|float16")
    return fallback


def check_hf_tensors(reader: HFCheckpointReader, cfg: ModelConfig, prefix: str, global_rules,
                     layer_rules) -> None:
    """ValueError naming missing, unexpected or mis-shaped HF tensors (reads headers only)."""
    expected = {}
    for rule in global_rules:
        expected.update(zip(rule.names_for(None), rule.hf_shapes))
    for layer in range(cfg.num_layers):
        for rule in layer_rules:
            expected.update(zip(rule.names_for(layer), rule.hf_shapes))
    present = set(reader.names())
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"the HF checkpoint lacks {len(missing)} tensor(s) that a {cfg.family} model "
                         f"with this config.json needs, e.g. {missing[:5]}")
    unexpected = sorted(present - set(expected) - ignorable_hf_names(cfg, prefix))
    if unexpected:
        raise ValueError(f"the HF checkpoint has {len(unexpected)} tensor(s) this {cfg.family} "
                         f"architecture does not use, e.g. {unexpected[:5]}; is config.json the "
                         "right one for these weights?")
    for name, shape in expected.items():
        if tuple(reader.shape(name)) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(reader.shape(name))}, but config.json "
                             f"implies {tuple(shape)}")


class _ChunkProducer:
    """produce(key, offsets, sizes, dtype) for the streaming writer, from HF tensors."""

    def __init__(self, reader: HFCheckpointReader, global_rules, layer_rules):
        self.reader = reader
        self.global_rules = {r.key: r for r in global_rules}
        self.layer_rules = {LAYER_PREFIX + r.key: r for r in layer_rules}
        self._cached = (None, None)  # (key, layer) -> full tensor; fc1 is written in 2 chunks

    def keys(self) -> set[str]:
        return set(self.global_rules) | set(self.layer_rules)

    def _full(self, key: str, layer: Optional[int], dtype: torch.dtype) -> torch.Tensor:
        if self._cached[0] == (key, layer):
            return self._cached[1]
        self._cached = (None, None)
        rule = self.layer_rules[key] if layer is not None else self.global_rules[key]
        sources = [self.reader.get(name) for name in rule.names_for(layer)]
        full = rule.to_megatron(*sources).to(dtype)
        del sources
        self._cached = ((key, layer), full)
        return full

    def __call__(self, key, offsets, sizes, dtype):
        if key in self.layer_rules:
            layer, offsets, sizes = offsets[0], offsets[1:], sizes[1:]
            full = self._full(key, layer, dtype)
            index = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
            return full[index].unsqueeze(0)
        full = self._full(key, None, dtype)
        return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def convert_hf_to_megatron(hf_dir: PathLike, out_dir: PathLike, *, tp: int = 1, pp: int = 1,
                           dtype: Optional[str] = None, force: bool = False,
                           vocab_multiple: int = DEFAULT_VOCAB_MULTIPLE) -> ModelConfig:
    """Convert an HF folder to a model checkpoint in `out_dir`; returns its ModelConfig.

    The written checkpoint loads at any TP/PP; `tp`/`pp` are checked to be a valid layout for
    this architecture (TP divides the heads, the KV groups when there are at least TP of them,
    the FFN width; PP divides the layers), so a bad target fails here and not at training time.
    """
    from megatron.core import dist_checkpointing

    from megatron_csd.conversion.streaming_save import LazyTensorSaveStrategy
    from megatron_csd.models.builder import build_gpt_model

    check_output_dir(out_dir, force)
    for name, value in (("tp", tp), ("pp", pp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    hf_config = read_hf_config(hf_dir)
    vocab = hf_config.get("vocab_size")
    cfg = hf_config_to_model_config(
        hf_config, padded_vocab_size=padded_vocab_size(int(vocab), multiple=vocab_multiple)
        if isinstance(vocab, int) else None)
    check_parallel_compatible(cfg, tp, pp)
    reader = HFCheckpointReader(hf_dir)
    prefix = hf_prefix_for(cfg, set(reader.names()))
    global_rules, layer_rules = conversion_rules(cfg, prefix)
    check_hf_tensors(reader, cfg, prefix, global_rules, layer_rules)
    first = global_rules[0].names_for(None)[0]
    params_dtype = resolve_dtype(dtype, hf_config, reader.dtype(first))
    producer = _ChunkProducer(reader, global_rules, layer_rules)

    with atomic_output_dir(out_dir, force) as tmp:
        with single_process_model_parallel():
            with torch.device("meta"):
                model = build_gpt_model(cfg, params_dtype=params_dtype, use_te=False,
                                        perform_initialization=False, use_cpu_initialization=True)
            sharded = model.sharded_state_dict()
            tensor_keys = {v.key for v in sharded.values() if hasattr(v, "key")
                           and not v.key.endswith("_extra_state")}
            if tensor_keys != producer.keys():  # internal invariant: rules cover Megatron's keys
                raise AssertionError(f"conversion rules {sorted(producer.keys())} do not match "
                                     f"Megatron's keys {sorted(tensor_keys)}")
            (tmp / MODEL_SUBDIR).mkdir()
            dist_checkpointing.save(sharded, str(tmp / MODEL_SUBDIR),
                                    sharded_strategy=LazyTensorSaveStrategy(producer))
        write_model_config(tmp, cfg)
        # The original config.json (as hf_config.json) keeps the non-architecture fields
        # (token ids, ...) for the exporter; tokenizer and generation files travel along.
        shutil.copyfile(Path(hf_dir) / "config.json", tmp / HF_CONFIG_COPY)
        copy_side_files(hf_dir, tmp, [n for n in HF_SIDE_FILES if n != HF_CONFIG_COPY])
    return cfg
