"""Tokenizers behind one small interface: sentencepiece `tokenizer.model` and HF `tokenizer.json`.

`load_tokenizer(path)` accepts a file or a directory holding one of those files and returns an
object with `encode(text) -> list[int]` (no special tokens added), `decode(ids) -> str` (bos,
eos and pad ids dropped), `bos_id` (may be None: some tokenizers have no bos), `eos_id`,
`pad_id`, `vocab_size` and `fingerprint`.

Special ids are read from the tokenizer itself, never hard-coded: a sentencepiece model stores
them in its proto (Gemma: pad 0, eos 1, bos 2); an HF `tokenizer.json` does not, so they come
from `tokenizer_config.json` / `special_tokens_map.json` beside it, else from the usual token
names (`<bos>`, `<s>`, `<eos>`, `</s>`, `<|endoftext|>`, `<pad>`), else from explicit
arguments. A tokenizer without a pad token pads with eos (padding never reaches the loss).

`fingerprint` is a sha256 over the id -> piece table and the special ids. Two tokenizers with
the same fingerprint give the same meaning to every id, which is what distillation needs
(teacher and student logits are compared column by column); a sentencepiece model and the HF
`tokenizer.json` converted from it share a fingerprint when their pieces agree.
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"

_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer(abc.ABC):
    """Common interface; subclasses set the special ids and implement the piece-level calls."""

    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    source: str

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Implemented by each tokenizer backend."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    @abc.abstractmethod
    def _decode_pieces(self, ids: list[int]) -> str:
        """Implemented by each tokenizer backend."""

    @abc.abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """Implemented by each tokenizer backend."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` with bos, eos and pad removed (other special tokens are kept)."""
        special = {self.eos_id, self.pad_id}
        if self.bos_id is not None:
            special.add(self.bos_id)
        return self._decode_pieces([int(i) for i in ids if int(i) not in special])

    @property
    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            digest = hashlib.sha256()
            header = {"vocab_size": self.vocab_size, "bos": self.bos_id, "eos": self.eos_id,
                      "pad": self.pad_id}
            digest.update(json.dumps(header, sort_keys=True).encode())
            for token_id in range(self.vocab_size):
                digest.update(self.id_to_piece(token_id).encode("utf-8", "surrogatepass"))
                digest.update(b"\0")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        """Small JSON-able summary (stored in prepared-data metadata)."""
        return {"kind": type(self).__name__, "source": self.source, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "fingerprint": self.fingerprint}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Gemma, LLaMA ship `tokenizer.model`)."""

    def __init__(self, model_file: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        import sentencepiece

        if (model_file is None) == (model_proto is None):
            raise TypeError("give exactly one of model_file or model_proto")
        if model_file is not None:
            model_proto = Path(model_file).read_bytes()
            self.source = str(model_file)
        else:
            self.source = "<in-memory sentencepiece model>"
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise ValueError(f"{self.source} is not a valid sentencepiece model ({err}); "
                             "pass the tokenizer.model shipped with the checkpoint") from None
        self.vocab_size = self._sp.get_piece_size()
        if self._sp.eos_id() < 0:
            raise ValueError(f"sentencepiece model {self.source} defines no eos token; "
                             "train it with eos_id set (e.g. eos_id=1)")
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self._fingerprint = None

    def serialized_model(self) -> bytes:
        return self._sp.serialized_model_proto()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def _decode_pieces(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class HFTokenizer(Tokenizer):
    """An HF `tokenizer.json` read with the `tokenizers` library (no `transformers` needed)."""

    def __init__(self, json_file: str | os.PathLike, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ImportError("reading tokenizer.json needs the `tokenizers` package: "
                              "pip install tokenizers (or pip install -e '.[hf]')") from None
        self.source = str(json_file)
        try:
            self._tok = RustTokenizer.from_file(str(json_file))
        except Exception as err:
            raise ValueError(f"{json_file} is not a valid HF tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        configured = _configured_special_tokens(Path(json_file).parent)
        self.bos_id = self._special_id("bos", bos_token or configured.get("bos_token"), _BOS_NAMES,
                                       required=False)
        eos_id = self._special_id("eos", eos_token or configured.get("eos_token"), _EOS_NAMES,
                                  required=True)
        assert eos_id is not None
        self.eos_id = eos_id
        pad_id = self._special_id("pad", pad_token or configured.get("pad_token"), _PAD_NAMES,
                                  required=False)
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self._fingerprint = None

    def _special_id(self, role: str, configured: str | None, usual_names: Sequence[str],
                    required: bool) -> int | None:
        if configured is not None:
            token_id = self._tok.token_to_id(configured)
            if token_id is None:
                raise ValueError(f"{role} token {configured!r} (from the tokenizer config or "
                                 f"arguments) is not in the vocabulary of {self.source}")
            return token_id
        for name in usual_names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        if required:
            raise ValueError(f"cannot tell the {role} token of {self.source}: put a "
                             f"tokenizer_config.json with '{role}_token' beside it or pass "
                             f"{role}_token=... to load_tokenizer")
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _decode_pieces(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        return "" if piece is None else piece


def _configured_special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json, then special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        config_file = directory / name
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_file} is not valid JSON ({err})") from None
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):  # AddedToken serialisation: {"content": "<bos>", ...}
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def load_tokenizer(path: str | os.PathLike, *, bos_token: str | None = None,
                   eos_token: str | None = None, pad_token: str | None = None) -> Tokenizer:
    """Load `tokenizer.model` (sentencepiece) or `tokenizer.json` (HF) from a file or directory.

    A directory holding both prefers `tokenizer.model` (it carries the special ids itself).
    The *_token arguments only apply to HF tokenizers (sentencepiece models define their own).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; pass a tokenizer.model, "
                                "a tokenizer.json, or a directory holding one")
    if path.is_dir():
        candidates = [path / SENTENCEPIECE_FILE, path / HF_TOKENIZER_FILE]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            raise FileNotFoundError(f"{path} holds neither {SENTENCEPIECE_FILE} nor "
                                    f"{HF_TOKENIZER_FILE}")
        path = existing[0]
    if path.suffix == ".json":
        return HFTokenizer(path, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
    if any(t is not None for t in (bos_token, eos_token, pad_token)):
        raise ValueError("bos_token/eos_token/pad_token apply to HF tokenizer.json files only; "
                         "a sentencepiece model defines its special ids itself")
    return SentencePieceTokenizer(path)
