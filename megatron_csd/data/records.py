"""Instruction records from JSONL files (Dolly fields by default, Alpaca via a field map).

One JSON object per line. Dolly: `{"instruction": ..., "context": ..., "response": ...}`
(`context` optional, extra keys such as `category` ignored). Alpaca:
`{"instruction": ..., "input": ..., "output": ...}` with `FieldMap.alpaca()`. Blank lines are
skipped. A malformed line (bad JSON, not an object, missing or non-string field, empty
instruction or response) raises `MalformedRecordError` naming the file and the line number;
with `skip_malformed=True` such lines are counted and skipped instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator


class MalformedRecordError(ValueError):
    """A JSONL line that is not a valid instruction record; the message starts with file:line."""


@dataclass(frozen=True)
class InstructionRecord:
    instruction: str
    response: str
    context: str = ""


@dataclass(frozen=True)
class FieldMap:
    """JSON keys holding each part of a record; `context=None` means the data has no context."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"

    @classmethod
    def dolly(cls) -> "FieldMap":
        return cls()

    @classmethod
    def alpaca(cls) -> "FieldMap":
        return cls(instruction="instruction", context="input", response="output")

    @classmethod
    def parse(cls, spec: str) -> "FieldMap":
        """`dolly`, `alpaca`, or `instruction=KEY,context=KEY,response=KEY` (context may be empty)."""
        if spec == "dolly":
            return cls.dolly()
        if spec == "alpaca":
            return cls.alpaca()
        values: dict[str, str | None] = {}
        for part in spec.split(","):
            name, sep, key = part.partition("=")
            name, key = name.strip(), key.strip()
            if not sep or name not in ("instruction", "context", "response"):
                raise ValueError(f"bad field map {spec!r}: use 'dolly', 'alpaca' or "
                                 "'instruction=KEY,context=KEY,response=KEY'")
            if name in values:
                raise ValueError(f"bad field map {spec!r}: {name!r} given twice")
            values[name] = key or None
        missing = {"instruction", "response"} - values.keys()
        if missing or not values["instruction"] or not values["response"]:
            raise ValueError(f"bad field map {spec!r}: instruction and response keys are required")
        return cls(instruction=values["instruction"], context=values.get("context"),  # type: ignore[arg-type]
                   response=values["response"])  # type: ignore[arg-type]


@dataclass
class ReadStats:
    num_records: int = 0
    num_blank_lines: int = 0
    num_malformed: int = 0
    first_errors: list[str] = field(default_factory=list)  # up to 10 messages when skipping


def parse_record(line: str, fields: FieldMap, where: str) -> InstructionRecord:
    """One JSONL line -> InstructionRecord; `where` ("file:line") prefixes every error."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise MalformedRecordError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise MalformedRecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def text_field(key: str | None, required: bool) -> str:
        if key is None:
            return ""
        if key not in obj:
            if required:
                raise MalformedRecordError(
                    f"{where}: missing field {key!r} (keys present: {sorted(obj)}); use a field "
                    "map (e.g. --fields alpaca) if the data names its fields differently")
            return ""
        value = obj[key]
        if value is None and not required:
            return ""
        if not isinstance(value, str):
            raise MalformedRecordError(f"{where}: field {key!r} must be a string, "
                                       f"got {type(value).__name__}")
        if required and not value.strip():
            raise MalformedRecordError(f"{where}: field {key!r} is empty")
        return value

    return InstructionRecord(instruction=text_field(fields.instruction, True),
                             context=text_field(fields.context, False),
                             response=text_field(fields.response, True))


def read_records(path: str | os.PathLike, fields: FieldMap | None = None, *,
                 skip_malformed: bool = False, stats: ReadStats | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> Iterator[InstructionRecord]:
    """Yield the records of a JSONL file in order.

    `stats` (optional) is filled in as lines are read. `on_progress(bytes_read, total_bytes)` is
    called about every 1000 lines and once at the end.
    """
    fields = fields or FieldMap()
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data file {path} does not exist")
    total_bytes = path.stat().st_size
    bytes_read = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            bytes_read += len(raw)
            if on_progress is not None and line_number % 1000 == 0:
                on_progress(bytes_read, total_bytes)
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                error: MalformedRecordError | None = MalformedRecordError(f"{where}: not UTF-8 ({err})")
            else:
                if not line.strip():
                    stats.num_blank_lines += 1
                    continue
                try:
                    record = parse_record(line, fields, where)
                    error = None
                except MalformedRecordError as err:
                    error = err
            if error is not None:
                if not skip_malformed:
                    raise error
                stats.num_malformed += 1
                if len(stats.first_errors) < 10:
                    stats.first_errors.append(str(error))
                continue
            stats.num_records += 1
            yield record
    if on_progress is not None:
        on_progress(bytes_read, total_bytes)
