"""megatron_csd model checkpoint (any TP/PP it was written at) -> HF folder, streaming.

Reads the global tensors of one layer at a time from the dist checkpoint (dist_checkpointing
loads exactly the requested slices, whatever layout wrote them), maps them back to HF names
with the inverse rules of `mapping` (padding rows dropped), and writes safetensors shards of
at most `max_shard_bytes` (+ index when there are several). config.json is rebuilt from the
ModelConfig, keeping the non-architecture fields (token ids, ...) of the original HF config
stored as hf_config.json by the importer (and carried into trainer checkpoints). Tokenizer
files (tokenizer.model/.json, tokenizer_config.json with the chat template,
special_tokens_map.json, ...) come from one folder: `tokenizer_dir` when given (it must hold
a tokenizer), else the checkpoint; generation_config.json from the checkpoint unless
`tokenizer_dir` has one. A sentencepiece tokenizer.model without a tokenizer.json gets one
(`tokenizer_json`), so `AutoTokenizer` loads the folder without converting anything. Output appears atomically (temp folder + rename).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_csd.conversion.hf_config import model_config_to_hf_config
from megatron_csd.conversion.hf_to_megatron import DTYPES
from megatron_csd.conversion.mapping import LAYER_PREFIX, conversion_rules
from megatron_csd.conversion.output_dir import atomic_output_dir, check_output_dir
from megatron_csd.conversion.dist_reader import read_regions, read_tensor_metadata
from megatron_csd.models.checkpoint import (
    HF_CONFIG_COPY,
    TOKENIZER_FILES,
    TOKENIZER_VOCAB_FILES,
    copy_side_files,
    load_model_config,
    model_checkpoint_dir,
    resolve_model_checkpoint,
)
from megatron_csd.models.manifest import TRAINING_STATE_PREFIXES, verify_manifest

PathLike = Union[str, os.PathLike]
_DTYPE_NAME = {v: k for k, v in DTYPES.items()}


class _ShardWriter:
    """Accumulates HF tensors and flushes safetensors shards of bounded size."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.directory, self.max_shard_bytes = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        file_name = f"shard-{len(self.files):05d}.safetensors.partial"
        save_file(self.pending, str(self.directory / file_name), metadata={"format": "pt"})
        self.files.append((file_name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0][0], self.directory / "model.safetensors")
            return
        weight_map, total = {}, 0
        count = len(self.files)
        for index, (partial, names) in enumerate(self.files):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / partial, self.directory / final)
            total += (self.directory / final).stat().st_size
            weight_map.update({name: final for name in names})
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def _add_tokenizer_json(folder: Path) -> None:
    """tokenizer.json beside a sentencepiece tokenizer.model, so transformers loads it as is."""
    try:
        from megatron_csd.conversion.tokenizer_json import write_tokenizer_json

        reason = write_tokenizer_json(folder / "tokenizer.model", folder)
    except ImportError as err:  # `tokenizers` comes with the hf extra
        reason = f"{err.name or err} is not installed (pip install -e '.[hf]')"
    if reason is not None:
        warnings.warn(f"tokenizer.json not written ({reason}); transformers will convert "
                      "tokenizer.model itself when loading, which needs `pip install protobuf`",
                      stacklevel=3)


def check_tokenizer_dir(tokenizer_dir: PathLike) -> Path:
    """ValueError unless `tokenizer_dir` is a folder holding a tokenizer's vocabulary file."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise ValueError(f"--tokenizer-dir {path} is not a directory; pass the folder that holds "
                         f"the tokenizer files ({', '.join(TOKENIZER_VOCAB_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_VOCAB_FILES):
        raise ValueError(f"--tokenizer-dir {path} holds no tokenizer: none of "
                         f"{', '.join(TOKENIZER_VOCAB_FILES)} is there")
    return path


def _expected_global_shapes(cfg, global_rules, layer_rules) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for rule in global_rules + layer_rules:
        shape = tuple(rule.to_megatron(*[torch.empty(s, device="meta") for s in rule.hf_shapes]).shape)
        if rule.key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            shape = (cfg.padded_vocab_size,) + shape[1:]
        if rule in layer_rules:
            shapes[LAYER_PREFIX + rule.key] = (cfg.num_layers,) + shape
        else:
            shapes[rule.key] = shape
    return shapes


def convert_megatron_to_hf(load_dir: PathLike, out_dir: PathLike, *, dtype: Optional[str] = None,
                           force: bool = False, tokenizer_dir: Optional[PathLike] = None,
                           max_shard_bytes: int = 2 * 1024 ** 3, verify: bool = True) -> dict:
    """Export the model checkpoint in `load_dir` to an HF folder; returns the HF config dict.

    `load_dir` is a model checkpoint (model_config.json + model/), e.g. a converted teacher or
    one `iter_*` folder of a training run, or a training save directory (its `latest` one).
    """
    check_output_dir(out_dir, force)
    if tokenizer_dir is not None:
        tokenizer_dir = check_tokenizer_dir(tokenizer_dir)
    load_dir = resolve_model_checkpoint(load_dir)
    cfg = load_model_config(load_dir)
    checkpoint = model_checkpoint_dir(load_dir)
    if verify:  # the files the export reads, against the checkpoint's manifest.json
        notice = verify_manifest(load_dir, skip=TRAINING_STATE_PREFIXES)
        if notice:
            print(f"note: {notice}", file=sys.stderr)
    global_rules, layer_rules = conversion_rules(cfg, "transformer." if cfg.family == "gpt2" else "model.")
    expected = _expected_global_shapes(cfg, global_rules, layer_rules)
    stored = read_tensor_metadata(checkpoint)
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ValueError(f"checkpoint {load_dir} lacks tensors {missing[:5]} that its "
                         f"model_config.json ({cfg.family}) implies")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise ValueError(f"checkpoint {load_dir} has tensors {unexpected[:5]} that a "
                         f"{cfg.family} model does not have; is model_config.json right?")
    for key, shape in expected.items():
        if stored[key][0] != shape:
            raise ValueError(f"checkpoint tensor {key!r} has shape {stored[key][0]}, but "
                             f"model_config.json implies {shape}")
    source_dtype = stored["embedding.word_embeddings.weight"][1]
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype] if dtype else source_dtype
    original = None
    if (Path(load_dir) / HF_CONFIG_COPY).is_file():
        original = json.loads((Path(load_dir) / HF_CONFIG_COPY).read_text())
    hf_config = model_config_to_hf_config(cfg, dtype=_DTYPE_NAME[out_dtype], original=original)

    with atomic_output_dir(out_dir, force) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)

        def emit(rule, layer, tensor):
            for name, hf_tensor in zip(rule.names_for(layer), rule.to_hf(tensor)):
                writer.add(name, hf_tensor.to(out_dtype))

        for rule in global_rules:
            shape = expected[rule.key]
            tensor = read_regions(checkpoint, {rule.key: ((0,) * len(shape), shape, stored[rule.key][1])})
            emit(rule, None, tensor[rule.key])
            del tensor
        for layer in range(cfg.num_layers):
            keys = [LAYER_PREFIX + r.key for r in layer_rules]
            tensors = read_regions(checkpoint, {
                key: ((layer,) + (0,) * (len(expected[key]) - 1), (1,) + expected[key][1:],
                      stored[key][1]) for key in keys})
            for rule in layer_rules:
                emit(rule, layer, tensors[LAYER_PREFIX + rule.key][0])
            del tensors
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        # One tokenizer, from one folder (mixing a tokenizer.json of the checkpoint with a
        # tokenizer.model of --tokenizer-dir would give two different tokenizers).
        copy_side_files(tokenizer_dir or load_dir, tmp, TOKENIZER_FILES + ("generation_config.json",))
        if tokenizer_dir is not None and not (tmp / "generation_config.json").is_file():
            copy_side_files(load_dir, tmp, ("generation_config.json",))
        if (tmp / "tokenizer.model").is_file() and not (tmp / "tokenizer.json").is_file():
            _add_tokenizer_json(tmp)
    return hf_config
