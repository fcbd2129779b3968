"""Model-only checkpoints: `DIR/model_config.json` + `DIR/model/` (Megatron dist_checkpointing).

The `model/` folder is a `torch_dist` dist_checkpointing checkpoint of `model.sharded_state_dict()`.
It stores global (unsharded) tensors, so a checkpoint written at one TP/PP layout loads at any
other: each rank reads just the slices of the global tensors its shard covers. The converter
(`megatron_csd.conversion`) writes the same layout without building a model, and the trainer's
own checkpoints embed it, so one loader serves teachers, students and exports.

Vocabulary re-padding: when the model was built with a different `padded_vocab_size` than the
checkpoint (teacher and student must share one padded size at run time), the embedding and
untied output layer are read whole on every rank and the rank's rows of the new padded layout
are copied out of them (rows past the saved padding are zero).

HF side files: a checkpoint converted from HF also holds the original `config.json` as
`hf_config.json` and the tokenizer files; `load_model` records where a model was loaded from
(`csd_checkpoint_source` on the GPTModel) so the trainer can carry these files into its own
checkpoints and the exporter can rebuild a faithful HF folder (token ids, chat template).

Writers and loaders are collective: every rank of the job calls them. A script that saves must
be guarded by `if __name__ == "__main__":` (the filesystem writer starts spawn processes that
re-import the main module; unguarded, the save hangs).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from megatron_csd.models.config import ModelConfig

MODEL_CONFIG_FILE = "model_config.json"
MODEL_SUBDIR = "model"
CONFIG_ATTRIBUTE = "csd_model_config"  # set on GPTModels by build_gpt_model
SOURCE_ATTRIBUTE = "csd_checkpoint_source"  # set on GPTModels by load_model
LATEST_FILE = "latest"  # a trainer save directory names its newest iteration here
HF_CONFIG_COPY = "hf_config.json"  # the HF config.json a checkpoint was converted from
# Files of an HF tokenizer (one tokenizer: copy them from a single folder).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")
# The files that hold the vocabulary itself; a tokenizer folder needs at least one of them.
TOKENIZER_VOCAB_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json")
# Everything besides the weights that an HF export needs, carried along with a checkpoint.
HF_SIDE_FILES = (HF_CONFIG_COPY, "generation_config.json") + TOKENIZER_FILES
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")
# Fields that may differ between a checkpoint and the model that loads it.
_RUNTIME_FIELDS = ("hidden_dropout", "attention_dropout", "init_method_std", "padded_vocab_size")

PathLike = Union[str, os.PathLike]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (a single model chunk)."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError(f"expected one model chunk (no virtual pipeline), got {len(model)}")
        model = model[0]
    while not hasattr(model, CONFIG_ATTRIBUTE) and hasattr(model, "module"):
        model = model.module
    return model


def write_model_config(directory: PathLike, cfg: ModelConfig) -> None:
    """Write `model_config.json` atomically (temp file + rename)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)


def load_model_config(directory: PathLike) -> ModelConfig:
    """The ModelConfig stored with a checkpoint (ValueError if the folder is not one)."""
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not a megatron_csd model checkpoint: {MODEL_CONFIG_FILE} "
                         "is missing (convert HF checkpoints with tools/convert_hf_to_megatron.py)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return ModelConfig.from_dict(data)


def resolve_model_checkpoint(directory: PathLike) -> Path:
    """A model checkpoint folder as given, or a trainer save directory -> its `latest` iteration.

    A folder with model_config.json is a checkpoint itself; otherwise a `latest` file names
    the iteration folder to use. ValueError when `latest` names a folder that is not a
    complete model checkpoint.
    """
    directory = Path(directory)
    latest = directory / LATEST_FILE
    if (directory / MODEL_CONFIG_FILE).is_file() or not latest.is_file():
        return directory
    target = directory / latest.read_text().strip()
    if not (target / MODEL_CONFIG_FILE).is_file():
        raise ValueError(f"{latest} names {target.name!r}, which is not a model checkpoint "
                         f"({MODEL_CONFIG_FILE} missing); pass one iter_* folder instead")
    return target


def checkpoint_source(model) -> Optional[str]:
    """The checkpoint folder `model` was last loaded from or saved to (None: neither)."""
    return getattr(_unwrap(model), SOURCE_ATTRIBUTE, None)


def record_checkpoint_source(model, directory: PathLike) -> None:
    """Remember `directory` as the checkpoint `model` now corresponds to (see checkpoint_source)."""
    setattr(_unwrap(model), SOURCE_ATTRIBUTE, str(directory))


def copy_side_files(source: PathLike, target: PathLike, names=HF_SIDE_FILES) -> list[str]:
    """Copy those of `names` that exist in `source` into `target`; returns the names copied."""
    copied = []
    for name in names:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def model_checkpoint_dir(directory: PathLike) -> Path:
    """The dist_checkpointing folder of a model checkpoint, checked to be complete."""
    path = Path(directory) / MODEL_SUBDIR
    if not (path / "metadata.json").is_file():
        raise ValueError(f"{directory} has no complete model checkpoint ({MODEL_SUBDIR}/metadata.json "
                         "missing): the save did not finish or this is not a checkpoint folder")
    return path


def save_model(model, directory: PathLike, cfg: ModelConfig) -> None:
    """Save `model` (all ranks call) to `directory` as model_config.json + model/.

    `directory/model` must not exist yet or be empty. metadata.json is written last by
    dist_checkpointing, so an interrupted save is recognisable (see `model_checkpoint_dir`).
    """
    from megatron.core import dist_checkpointing

    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    model = _unwrap(model)
    path = Path(directory) / MODEL_SUBDIR
    # Checked on every rank (shared filesystem) so that all ranks raise together.
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} already holds files; save to a new directory")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_model_config(directory, cfg)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(path))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_loadable(saved: ModelConfig, wanted: ModelConfig) -> None:
    """ValueError naming every architecture field on which the checkpoint and model differ."""
    diffs = [f"{name}: checkpoint {value!r} vs model {getattr(wanted, name)!r}"
             for name, value in saved.to_dict().items()
             if name not in _RUNTIME_FIELDS and getattr(wanted, name) != value]
    if diffs:
        raise ValueError("checkpoint and model architectures differ (" + "; ".join(diffs) + ")")


def load_model(model, directory: PathLike, *, verify: bool = True) -> ModelConfig:
    """Load a model checkpoint into `model` at this run's TP/PP layout (all ranks call).

    `model` is a GPTModel built by `build_gpt_model` (optionally wrapped). Returns the saved
    ModelConfig. Raises ValueError when the architectures differ, and (`verify`) a
    CheckpointDamagedError when a file differs from the checkpoint's manifest.
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_csd.models.manifest import TRAINING_STATE_PREFIXES, verify_checkpoint

    inner = _unwrap(model)
    saved = load_model_config(directory)
    wanted = getattr(inner, CONFIG_ATTRIBUTE, None)
    if wanted is None:
        raise ValueError("load_model needs a model built by megatron_csd.models.build_gpt_model")
    check_loadable(saved, wanted)
    path = model_checkpoint_dir(directory)
    verify_checkpoint(directory, skip=TRAINING_STATE_PREFIXES, enabled=verify)
    sharded = inner.sharded_state_dict()
    repad = {}
    if saved.padded_vocab_size != wanted.padded_vocab_size:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        for key in _VOCAB_KEYS:
            if key in sharded and isinstance(sharded[key], ShardedTensor):
                local = sharded[key].data
                full = torch.empty(saved.padded_vocab_size, local.shape[1], dtype=local.dtype)
                repad[key] = local
                sharded[key] = ShardedTensor.from_rank_offsets(
                    sharded[key].key, full, replica_id=(0, tp_rank, dp_rank))
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        state, _, unexpected = dist_checkpointing.load(sharded, str(path),
                                                       strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as err:  # dist_checkpointing reports mismatches deep inside torch DCP
        raise ValueError(f"could not load the model checkpoint {path}: {err}") from err
    # Requested but absent: only `_extra_state` objects may be (transformer-engine keeps FP8
    # scaling metadata there, e.g. a TE teacher loading a checkpoint converted with the local
    # spec); they are rebuilt at run time. A missing weight is an error.
    absent_weights = sorted(k for k in unexpected if "_extra_state" not in k)
    if absent_weights:
        raise ValueError(f"the model checkpoint {path} lacks weights {absent_weights[:5]} that "
                         "this model needs")
    for key, local in repad.items():
        full = state[key]
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        rows = local.shape[0]
        start = tp_rank * rows
        new = torch.zeros_like(local)
        available = max(0, min(rows, full.shape[0] - start))
        new[:available] = full[start:start + available]
        state[key] = new
    incompatible = inner.load_state_dict(state, strict=False)
    not_loaded = [k for k in incompatible.missing_keys if not k.endswith("_extra_state")]
    if not_loaded or incompatible.unexpected_keys:
        raise ValueError(f"the model checkpoint {path} does not fit this model: missing "
                         f"{not_loaded[:5]}, unexpected {incompatible.unexpected_keys[:5]}")
    record_checkpoint_source(inner, directory)
    return saved
