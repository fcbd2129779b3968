"""Read the parts of a sentencepiece ``tokenizer.model`` that a ``tokenizer.json`` needs.

A ``tokenizer.model`` is a serialized ``sentencepiece.ModelProto`` (protobuf). The
``sentencepiece`` Python package does not expose the piece types, the model type or the
normalizer flags without the ``protobuf`` package, so this module decodes the few fields needed
straight from the protobuf wire format (varint keys; wire types 0 varint, 1 fixed64,
2 length-delimited, 5 fixed32):

- ``ModelProto.pieces`` (1, repeated): ``piece`` (1, string), ``score`` (2, float),
  ``type`` (3, enum: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6);
- ``ModelProto.trainer_spec`` (2): ``model_type`` (3, enum: UNIGRAM 1, BPE 2, WORD 3, CHAR 4),
  ``byte_fallback`` (35, bool);
- ``ModelProto.normalizer_spec`` (3): ``name`` (1), ``precompiled_charsmap`` (2),
  ``add_dummy_prefix`` (3), ``remove_extra_whitespaces`` (4), ``escape_whitespaces`` (5).

Absent fields take the proto2 defaults of sentencepiece_model.proto (UNIGRAM, NORMAL, and
True for the three normalizer flags).
"""
from __future__ import annotations

import struct
from typing import Iterator, NamedTuple

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class Piece(NamedTuple):
    piece: str
    score: float
    type: int


class SentencePieceModel(NamedTuple):
    pieces: list[Piece]
    model_type: str
    byte_fallback: bool
    normalizer_name: str
    precompiled_charsmap: bytes
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value): int for varint/fixed, bytes for length-delimited."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def read_sentencepiece_model(proto: bytes) -> SentencePieceModel:
    """Decode the pieces, model type and normalizer flags of a serialized ModelProto."""
    pieces: list[Piece] = []
    model_type, byte_fallback = 1, False
    normalizer = {1: b"", 2: b"", 3: 1, 4: 1, 5: 1}
    for number, wire, value in _fields(proto):
        if number == 1 and wire == 2:
            fields = {1: b"", 2: struct.pack("<f", 0.0), 3: NORMAL}
            fields.update({n: v for n, _, v in _fields(value)})
            pieces.append(Piece(fields[1].decode("utf-8"), struct.unpack("<f", fields[2])[0],
                                int(fields[3])))
        elif number == 2 and wire == 2:
            for n, w, v in _fields(value):
                if n == 3 and w == 0:
                    model_type = v
                elif n == 35 and w == 0:
                    byte_fallback = bool(v)
        elif number == 3 and wire == 2:
            normalizer.update({n: v for n, _, v in _fields(value) if n in normalizer})
    if not pieces:
        raise ValueError("not a sentencepiece model: no pieces")
    return SentencePieceModel(
        pieces=pieces, model_type=MODEL_TYPES.get(model_type, f"unknown({model_type})"),
        byte_fallback=byte_fallback, normalizer_name=normalizer[1].decode("utf-8"),
        precompiled_charsmap=normalizer[2], add_dummy_prefix=bool(normalizer[3]),
        remove_extra_whitespaces=bool(normalizer[4]), escape_whitespaces=bool(normalizer[5]))
