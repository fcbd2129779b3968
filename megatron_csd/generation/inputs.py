"""Generation input lines (JSONL) -> prompt token ids.

Each line is a JSON object holding exactly one kind of prompt:
- ``prompt_ids``: token ids used verbatim (they must already hold bos if the model wants it);
  needs no tokenizer;
- ``prompt``: text; the ids are bos + tokenizer.encode(prompt);
- Dolly fields ``instruction`` (+ optional ``context``; ``response`` is ignored): rendered with
  the prompt template and encoded exactly as training encodes prompts (bos + head + tail,
  megatron_csd.data.encode_prompt).
An optional integer ``seed`` overrides the request's default seed. Every other field is kept
and copied to the output line. Errors name the file and line and say what to do.
"""
from __future__ import annotations

import json
from typing import Optional

_KINDS = ("prompt_ids", "prompt", "instruction")


def prompt_ids_for_line(record: dict, *, tokenizer, template: str = "dolly") -> list[int]:
    """The prompt ids of one input record (see module doc); ValueError when malformed."""
    from megatron_csd.data import InstructionRecord
    from megatron_csd.data.samples import encode_prompt

    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    kinds = [kind for kind in _KINDS if kind in record]
    if len(kinds) != 1:
        raise ValueError(f"a line needs exactly one of {list(_KINDS)} (Dolly: instruction "
                         f"[+ context]), found {kinds or sorted(record)}")
    kind = kinds[0]
    if kind == "prompt_ids":
        ids = record["prompt_ids"]
        if (not isinstance(ids, list) or not ids
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
            raise ValueError("prompt_ids must be a non-empty list of token ids (ints >= 0)")
        return list(ids)
    if tokenizer is None:
        raise ValueError(f"a {kind!r} line needs a tokenizer: pass --tokenizer (the checkpoint "
                         "has none), or give prompt_ids")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    if kind == "prompt":
        if not isinstance(record["prompt"], str):
            raise ValueError("prompt must be a string")
        ids = bos + tokenizer.encode(record["prompt"])
    else:
        fields = {name: record.get(name, "") for name in ("instruction", "context", "response")}
        bad = [name for name, value in fields.items() if not isinstance(value, str)]
        if bad:
            raise ValueError(f"Dolly fields {bad} must be strings")
        if not fields["instruction"].strip():
            raise ValueError("instruction is empty")
        ids = encode_prompt(InstructionRecord(instruction=fields["instruction"],
                                              response=fields["response"],
                                              context=fields["context"]), template, tokenizer)
    if not ids:
        raise ValueError("the prompt encodes to no tokens (empty prompt and no bos)")
    return ids


def read_requests(path: str, *, tokenizer, template: str, base_seed: int):
    """(records, GenerationRequest list) of a JSONL file; request i gets seed base_seed + i
    unless its line has an int ``seed``. ValueError "FILE line N: ..." on the first bad line."""
    from megatron_csd.generation.params import GenerationRequest

    records, requests = [], []
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise ValueError(f"--input {path}: cannot be read ({err.strerror})") from None
    with handle:
        try:
            lines = handle.readlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"--input {path} is not UTF-8 text ({err.reason})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ids = prompt_ids_for_line(record, tokenizer=tokenizer, template=template)
                seed: Optional[int] = record.get("seed", base_seed + len(requests))
                if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
                    raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
                requests.append(GenerationRequest(prompt_ids=ids, seed=seed))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg})") from None
            except ValueError as err:
                raise ValueError(f"{path} line {number}: {err}") from None
            records.append(record)
    if not requests:
        raise ValueError(f"--input {path} holds no requests (one JSON object per line)")
    return records, requests
