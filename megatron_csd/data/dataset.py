"""InstructionDataset: a prepared split (see prepare.py) read through memory maps, no tokenizing.

Item i is the dict of interfaces.md: tokens [s] int64, labels [s] int64, loss_mask [s] float32
(1 on response targets and the final eos), position_ids [s] int64 (rules in samples.py).
A batch is these stacked to [b, s] (`collate`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megatron_csd.data.prepare import FORMAT_NAME, FORMAT_VERSION, METADATA_FILE
from megatron_csd.data.samples import build_training_sample
from megatron_csd.data.tokenizer import Tokenizer


def read_metadata(path: str | os.PathLike) -> dict:
    """metadata.json of a prepared split directory, with errors that say what to pass instead."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        if path.is_dir() and any((path / split / METADATA_FILE).is_file() for split in ("train", "valid")):
            raise ValueError(f"{path} holds prepared splits; pass {path / 'train'} or {path / 'valid'}")
        raise FileNotFoundError(f"{path} is not a prepared dataset (no {METADATA_FILE}); create it "
                                "with tools/prepare_data.py")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file} is corrupt ({err}); re-run tools/prepare_data.py") from None
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file} has format {meta.get('format')!r} version {meta.get('version')!r};"
                         f" this code reads {FORMAT_NAME!r} version {FORMAT_VERSION}: re-run "
                         "tools/prepare_data.py")
    return meta


class InstructionDataset(torch.utils.data.Dataset):
    """Prepared instruction samples padded/shifted to `seq_length`.

    `tokenizer` or `expected_fingerprint` (optional) must match the tokenizer the data was
    prepared with. `seq_length` may differ from the prepared one as long as every sample fits
    (`seq_length + 1 >= longest sample`); otherwise re-prepare with the smaller length, which
    truncates prompts properly.
    """

    def __init__(self, path: str | os.PathLike, seq_length: int, *, tokenizer: Tokenizer | None = None,
                 expected_fingerprint: str | None = None):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        if not isinstance(seq_length, int) or seq_length < 1:
            raise ValueError(f"seq_length must be a positive int, got {seq_length!r}")
        longest = self.metadata["max_sample_ids"]
        if longest > seq_length + 1:
            raise ValueError(f"{self.path} was prepared with seq_length {self.metadata['seq_length']} "
                             f"and its longest sample has {longest} ids, more than seq_length "
                             f"{seq_length} + 1: re-run tools/prepare_data.py with --seq-length "
                             f"{seq_length}")
        fingerprint = self.metadata["tokenizer"]["fingerprint"]
        for name, expected in (("tokenizer", tokenizer.fingerprint if tokenizer else None),
                               ("expected_fingerprint", expected_fingerprint)):
            if expected is not None and expected != fingerprint:
                raise ValueError(f"{self.path} was tokenized with "
                                 f"{self.metadata['tokenizer']['source']} (fingerprint "
                                 f"{fingerprint[:12]}), which differs from the given {name} "
                                 f"(fingerprint {expected[:12]}): prepare the data with the "
                                 "models' tokenizer")
        self.seq_length = seq_length
        self.pad_id = int(self.metadata["tokenizer"]["pad_id"])
        try:
            self._tokens = np.load(self.path / "tokens.npy", mmap_mode="r")
            self._offsets = np.load(self.path / "offsets.npy")
            self._prompt_lengths = np.load(self.path / "prompt_lengths.npy")
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.path} is incomplete or corrupt ({err}); re-run "
                             "tools/prepare_data.py") from None
        num = self.metadata["num_samples"]
        if (self._offsets.shape != (num + 1,) or self._prompt_lengths.shape != (num,)
                or int(self._offsets[-1]) != self._tokens.shape[0]):
            raise ValueError(f"{self.path}: array sizes disagree with {METADATA_FILE}; re-run "
                             "tools/prepare_data.py")

    def __len__(self) -> int:
        return len(self._prompt_lengths)

    def sample_ids(self, index: int) -> np.ndarray:
        """The stored ids of sample `index` (prompt + response + eos, unpadded)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        index %= len(self)
        return np.asarray(self._tokens[self._offsets[index]:self._offsets[index + 1]], dtype=np.int64)

    def sample_num_ids(self) -> np.ndarray:
        """Stored ids per sample ([num_samples] int64; a sample fills `ids - 1` positions)."""
        return np.diff(self._offsets).astype(np.int64)

    def prompt_length(self, index: int) -> int:
        return int(self._prompt_lengths[index])

    def prompt_and_response(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids incl. bos, response ids incl. eos unless truncated) of sample `index`,
        e.g. to generate from the prompt and score against the reference response."""
        ids = self.sample_ids(index)
        split = int(self._prompt_lengths[index])
        return ids[:split], ids[split:]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        ids = self.sample_ids(index)
        return build_training_sample(ids, int(self._prompt_lengths[index]), self.seq_length, self.pad_id)

    def masked_sample(self) -> dict[str, torch.Tensor]:
        """An all-padding sample with loss_mask 0 (fills uneven evaluation batches)."""
        return build_training_sample([self.pad_id], 1, self.seq_length, self.pad_id)


def collate(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack per-sample dicts into a batch dict of [b, s] tensors."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
