"""Datasets and iterators for a run (thin glue over ``megatron_csd.data``).

``data.train_path`` / ``data.valid_path`` are either prepared split directories
(``tools/prepare_data.py`` output, e.g. ``OUT/train``) or raw instruction JSONL files; JSONL is
tokenized once by global rank 0 into ``OUTPUT_DIR/prepared`` (other ranks wait at a barrier).
Every rank then memory-maps the prepared split and draws its own data-parallel share through
the deterministic, resumable sampler -- all TP and PP ranks of one DP rank draw the same
microbatches, so no broadcast is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_csd.training.config import TrainConfig

DEFAULT_TEMPLATE = "dolly"


@dataclass
class RunData:
    tokenizer: object
    train: object            # InstructionDataset
    valid: Optional[object]  # InstructionDataset or None


def _is_prepared(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.json").is_file()


def _prepare_jsonl(config: TrainConfig, tokenizer, rank: int) -> tuple[Path, Optional[Path]]:
    from megatron_csd.data import prepare_dataset

    out_dir = Path(config.logging.output_dir) / "prepared"
    valid = config.data.valid_path
    if rank == 0:
        prepare_dataset(config.data.train_path, tokenizer, out_dir,
                        seq_length=config.training.seq_length,
                        template=config.data.template or DEFAULT_TEMPLATE,
                        valid_input=valid)
    dist.barrier()
    return out_dir / "train", (out_dir / "valid") if valid is not None else None


def load_run_data(config: TrainConfig, rank: int) -> RunData:
    from megatron_csd.data import InstructionDataset, load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer)
    train_path = Path(config.data.train_path)
    valid_path = Path(config.data.valid_path) if config.data.valid_path else None
    if not train_path.exists():
        raise ValueError(f"data.train_path {train_path} does not exist")
    if valid_path is not None and not valid_path.exists():
        raise ValueError(f"data.valid_path {valid_path} does not exist")
    if train_path.is_file():
        if valid_path is not None and not valid_path.is_file():
            raise ValueError("give train and valid data in the same form: both JSONL files or "
                             "both prepared split directories")
        train_path, valid_path = _prepare_jsonl(config, tokenizer, rank)
    elif config.data.template is not None:
        raise ValueError("data.template applies to raw JSONL input only; prepared data already "
                         "carries its template (re-run tools/prepare_data.py to change it)")
    seq = config.training.seq_length
    train = InstructionDataset(train_path, seq, tokenizer=tokenizer)
    valid = InstructionDataset(valid_path, seq, tokenizer=tokenizer) if valid_path else None
    return RunData(tokenizer=tokenizer, train=train, valid=valid)


class _Limited:
    """The first ``limit`` samples of a dataset (keeps ``masked_sample`` for padding)."""

    def __init__(self, dataset, limit: int):
        self.dataset = dataset
        self.length = min(len(dataset), limit) if limit > 0 else len(dataset)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.dataset[index]

    def masked_sample(self):
        return self.dataset.masked_sample()


def to_device(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    for batch in batches:
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def eval_iterator(dataset, config: TrainConfig, *, dp_rank: int, dp_size: int,
                  device: torch.device) -> tuple[Iterator[dict], int]:
    """(iterator, microbatches per rank) for one pass over the first eval_samples samples."""
    from megatron_csd.data import eval_batches, num_eval_batches

    limited = _Limited(dataset, config.training.eval_samples)
    mbs = config.training.micro_batch_size
    count = num_eval_batches(len(limited), mbs, dp_size)
    batches = eval_batches(limited, mbs, dp_rank=dp_rank, dp_size=dp_size)
    return to_device(batches, device), count

