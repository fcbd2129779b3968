"""Streaming reader for HF checkpoint folders: one tensor at a time, never the whole model.

Supported layouts: `model.safetensors`, sharded safetensors with `model.safetensors.index.json`,
`pytorch_model.bin`, sharded `pytorch_model.bin.index.json`. Shapes and dtypes come from file
headers (safetensors) or a memory-mapped load (`torch.load(mmap=True)`), so listing tensors
reads no weights. Each `get` re-opens its file and returns a private copy, so memory-mapped
pages are released after every tensor and the reader's resident memory stays at the size of
the tensor being converted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Union

import torch

PathLike = Union[str, os.PathLike]

_SAFE_SINGLE = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"
_BIN_SINGLE = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_hf_config(hf_dir: PathLike) -> dict:
    """config.json of an HF model folder (ValueError when missing or malformed)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ValueError(f"HF checkpoint folder {hf_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"{hf_dir} has no config.json; pass the folder of an HF model "
                         "(the one with config.json and the weight files)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


class HFCheckpointReader:
    """Name -> (file, shape, dtype) index of an HF checkpoint, with per-tensor loading."""

    def __init__(self, hf_dir: PathLike):
        self.hf_dir = Path(hf_dir)
        self._file_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if (self.hf_dir / _SAFE_INDEX).is_file():
            self.format = "safetensors"
            files = self._files_from_index(_SAFE_INDEX)
        elif (self.hf_dir / _SAFE_SINGLE).is_file():
            self.format = "safetensors"
            files = [self.hf_dir / _SAFE_SINGLE]
        elif (self.hf_dir / _BIN_INDEX).is_file():
            self.format = "bin"
            files = self._files_from_index(_BIN_INDEX)
        elif (self.hf_dir / _BIN_SINGLE).is_file():
            self.format = "bin"
            files = [self.hf_dir / _BIN_SINGLE]
        else:
            raise ValueError(
                f"no weights found in {self.hf_dir}: expected {_SAFE_SINGLE}, {_SAFE_INDEX}, "
                f"{_BIN_SINGLE} or {_BIN_INDEX}")
        for file in files:
            scan = self._scan_safetensors if self.format == "safetensors" else self._scan_bin
            for name, shape, dtype in scan(file):
                if name in self._file_of:
                    raise ValueError(f"tensor {name!r} appears in both {self._file_of[name].name} "
                                     f"and {file.name}")
                self._file_of[name] = file
                self._meta[name] = (shape, dtype)

    def _files_from_index(self, index_name: str) -> list[Path]:
        index_path = self.hf_dir / index_name
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path} is not a valid weight index ({err})") from err
        files = []
        for name in sorted(set(weight_map.values())):
            path = self.hf_dir / name
            if not path.is_file():
                raise ValueError(f"{index_name} lists {name}, which is missing from {self.hf_dir}")
            files.append(path)
        return files

    @staticmethod
    def _scan_safetensors(path: Path) -> Iterable[tuple[str, tuple[int, ...], torch.dtype]]:
        # Header only: 8-byte little-endian length + JSON (no weights read).
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            try:
                header = json.loads(handle.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not a safetensors file ({err})") from err
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} in {path.name} has unsupported dtype {info['dtype']}")
            yield name, tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]]

    @staticmethod
    def _load_bin(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:  # pickle / zip errors come in many types
            raise ValueError(f"could not read {path} as a PyTorch state dict: {err}") from err

    def _scan_bin(self, path: Path):
        state = self._load_bin(path)
        for name, tensor in state.items():
            if isinstance(tensor, torch.Tensor):
                yield name, tuple(tensor.shape), tensor.dtype
        del state

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        """A private in-memory copy of one tensor."""
        if name not in self._file_of:
            raise ValueError(f"tensor {name!r} is not in the checkpoint {self.hf_dir}")
        path = self._file_of[name]
        if self.format == "safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(name)
            return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
        state = self._load_bin(path)
        tensor = state[name].clone()
        del state
        return tensor
