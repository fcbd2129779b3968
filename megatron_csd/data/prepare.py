"""Tokenize instruction JSONL once into a compact on-disk dataset (read by InstructionDataset).

Layout written under OUT (one directory per split, `valid/` only when there is a valid set):

    OUT/train/tokens.npy          all samples' ids back to back (uint16 if vocab <= 65536, else int32)
    OUT/train/offsets.npy         int64 [n + 1]; sample i is tokens[offsets[i]:offsets[i + 1]]
    OUT/train/prompt_lengths.npy  int32 [n]; the first prompt_lengths[i] ids are prompt (incl. bos)
    OUT/train/metadata.json       format version, template, seq length, tokenizer fingerprint, counts
    OUT/valid/...                 same layout
    OUT/prepare.json              the command's settings and line statistics

Each sample holds at most `seq_length + 1` ids (truncated as described in samples.py). A split
by `valid_fraction` is exact and deterministic: a seeded permutation of the record indices picks
round(fraction * n) validation records; both splits keep file order.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from megatron_csd.data.records import FieldMap, ReadStats, read_records
from megatron_csd.data.samples import TokenizedSample, tokenize_records
from megatron_csd.data.templates import check_template
from megatron_csd.data.tokenizer import Tokenizer

FORMAT_NAME = "megatron_csd.instruction_data"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
_CHUNK_RECORDS = 1000


@dataclass
class _PackedSamples:
    tokens: np.ndarray        # flat ids
    offsets: np.ndarray       # int64 [n + 1]
    prompt_lengths: np.ndarray  # int32 [n]
    prompt_truncated: np.ndarray  # bool [n]
    response_truncated: np.ndarray  # bool [n]

    @classmethod
    def from_samples(cls, samples: list[TokenizedSample], token_dtype) -> "_PackedSamples":
        lengths = np.array([len(s.ids) for s in samples], dtype=np.int64)
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for s in samples for t in s.ids), dtype=token_dtype,
                             count=int(offsets[-1]))
        return cls(tokens, offsets,
                   np.array([s.prompt_length for s in samples], dtype=np.int32),
                   np.array([s.prompt_truncated for s in samples], dtype=bool),
                   np.array([s.response_truncated for s in samples], dtype=bool))

    @classmethod
    def concatenate(cls, parts: list["_PackedSamples"], token_dtype) -> "_PackedSamples":
        if not parts:
            return cls.from_samples([], token_dtype)
        shifts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + shift for p, shift in zip(parts, shifts)])
        return cls(np.concatenate([p.tokens for p in parts]), offsets.astype(np.int64),
                   np.concatenate([p.prompt_lengths for p in parts]),
                   np.concatenate([p.prompt_truncated for p in parts]),
                   np.concatenate([p.response_truncated for p in parts]))

    def __len__(self) -> int:
        return len(self.prompt_lengths)

    def select(self, indices: np.ndarray) -> "_PackedSamples":
        lengths = (self.offsets[1:] - self.offsets[:-1])[indices]
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in indices]
        tokens = np.concatenate(pieces) if pieces else self.tokens[:0]
        return _PackedSamples(tokens, offsets, self.prompt_lengths[indices],
                              self.prompt_truncated[indices], self.response_truncated[indices])


@dataclass(frozen=True)
class PrepareResult:
    splits: dict[str, dict]      # split name -> its metadata.json content
    read_stats: dict[str, dict]  # input file -> ReadStats as a dict (records, blank, malformed)


def token_dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _tokenize_file(path, fields, tokenizer, template, seq_length, max_prompt_length,
                   skip_malformed, stats, on_progress) -> _PackedSamples:
    dtype = token_dtype_for(tokenizer.vocab_size)
    parts, chunk = [], []

    def flush():
        samples = tokenize_records(chunk, template, tokenizer, seq_length=seq_length,
                                   max_prompt_length=max_prompt_length)
        parts.append(_PackedSamples.from_samples(samples, dtype))
        chunk.clear()

    for record in read_records(path, fields, skip_malformed=skip_malformed, stats=stats,
                               on_progress=on_progress):
        chunk.append(record)
        if len(chunk) == _CHUNK_RECORDS:
            flush()
    if chunk:
        flush()
    return _PackedSamples.concatenate(parts, dtype)


def _write_split(directory: Path, packed: _PackedSamples, metadata: dict) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "tokens.npy", packed.tokens)
    np.save(directory / "offsets.npy", packed.offsets)
    np.save(directory / "prompt_lengths.npy", packed.prompt_lengths)
    lengths = packed.offsets[1:] - packed.offsets[:-1]
    metadata = dict(metadata)
    metadata.update(
        num_samples=len(packed),
        num_tokens=int(packed.offsets[-1]),
        max_sample_ids=int(lengths.max()) if len(packed) else 0,
        # targets with loss: response tokens + eos = ids after the prompt
        num_loss_tokens=int((lengths - packed.prompt_lengths).sum()),
        num_prompt_truncated=int(packed.prompt_truncated.sum()),
        num_response_truncated=int(packed.response_truncated.sum()),
    )
    # metadata last: its presence marks a complete split
    tmp = directory / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / METADATA_FILE)
    return metadata


def check_new_prepared_dir(out_dir: Path) -> None:
    """ValueError when `out_dir` already holds a prepared dataset (or a partial one).

    Preparing is never done over an earlier result: that would silently replace data a run
    may be training on. Other files in `out_dir` are fine (they are never touched).
    """
    found = [name for name in ("prepare.json", "train", "valid") if (out_dir / name).exists()]
    if found:
        raise ValueError(f"--out {out_dir} already holds a prepared dataset ({', '.join(found)}); "
                         "choose a new --out, or delete those yourself to prepare it again")


def prepare_dataset(input_path: str | os.PathLike, tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                    seq_length: int, template: str, valid_input: str | os.PathLike | None = None,
                    valid_fraction: float = 0.0, split_seed: int = 1234,
                    max_prompt_length: int | None = None, fields: FieldMap | None = None,
                    skip_malformed: bool = False,
                    on_progress: Callable[[str, int, int], None] | None = None) -> "PrepareResult":
    """Tokenize `input_path` (and `valid_input`) into OUT/train[, OUT/valid].

    `on_progress(file, bytes_read, total_bytes)` reports reading progress.
    """
    check_template(template)
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if valid_input is not None and valid_fraction > 0:
        raise ValueError("give either a separate validation file or valid_fraction, not both")
    fields = fields or FieldMap()
    out_dir = Path(out_dir)
    check_new_prepared_dir(out_dir)

    def tokenize(path) -> tuple[_PackedSamples, ReadStats]:
        stats = ReadStats()
        progress = None if on_progress is None else (lambda done, total: on_progress(str(path), done, total))
        packed = _tokenize_file(path, fields, tokenizer, template, seq_length, max_prompt_length,
                                skip_malformed, stats, progress)
        return packed, stats

    packed, stats = tokenize(input_path)
    read_stats = {str(input_path): asdict(stats)}
    if len(packed) == 0:
        raise ValueError(f"{input_path} holds no instruction records")
    splits = {"train": packed}
    if valid_input is not None:
        splits["valid"], valid_stats = tokenize(valid_input)
        read_stats[str(valid_input)] = asdict(valid_stats)
    elif valid_fraction > 0:
        num_valid = int(round(valid_fraction * len(packed)))
        if num_valid == 0 or num_valid == len(packed):
            raise ValueError(f"valid_fraction {valid_fraction} of {len(packed)} records leaves an "
                             "empty split; change the fraction")
        order = np.random.default_rng(split_seed).permutation(len(packed))
        is_valid = np.zeros(len(packed), dtype=bool)
        is_valid[order[:num_valid]] = True
        splits = {"train": packed.select(np.flatnonzero(~is_valid)),
                  "valid": packed.select(np.flatnonzero(is_valid))}

    common = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "template": template,
        "seq_length": seq_length, "max_prompt_length": max_prompt_length,
        "fields": asdict(fields), "tokenizer": tokenizer.describe(),
    }
    written = {}
    for name, split in splits.items():
        written[name] = _write_split(out_dir / name, split, dict(common, split=name))
    summary = dict(common, inputs=read_stats, valid_input=None if valid_input is None else str(valid_input),
                   valid_fraction=valid_fraction, split_seed=split_seed,
                   splits={name: meta["num_samples"] for name, meta in written.items()})
    (out_dir / "prepare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return PrepareResult(splits=written, read_stats=read_stats)
