"""What an evaluation run does: named test files and the sampling / scoring settings.

Defaults follow the CSD paper's protocol (inherited from MiniLLM / DistiLLM): sampling with
temperature 1.0, top-k 0 (off), top-p 1.0 (off), over the five seeds 10, 20, 30, 40, 50 of
MiniLLM's evaluation scripts, scored with ROUGE-L against the reference answers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PAPER_SEEDS = (10, 20, 30, 40, 50)
RESERVED_NAMES = ("average",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TestFile:
    """A named instruction JSONL file (Dolly fields: instruction, context, response)."""

    name: str
    path: str

    __test__ = False  # not a pytest class

    @classmethod
    def parse(cls, spec: str) -> "TestFile":
        """``NAME=PATH``, or ``PATH`` alone (the name is the file name without its suffix)."""
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        name, path = name.strip(), path.strip()
        if not _NAME.match(name) or name in RESERVED_NAMES:
            raise ValueError(f"test file name {name!r} (from {spec!r}) must be letters, digits, '_', "
                             f"'.', '-' (used in file names) and not one of {list(RESERVED_NAMES)}; "
                             "write NAME=PATH")
        if not path:
            raise ValueError(f"test file {spec!r} has no path; write NAME=PATH")
        return cls(name, path)


def check_test_files(files) -> list:
    if not files:
        raise ValueError("no test file given: pass at least one --test-file NAME=PATH")
    names = [f.name for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"test file names must be unique, got {duplicates} more than once; "
                         "name them explicitly with NAME=PATH")
    for f in files:
        if not Path(f.path).is_file():
            raise ValueError(f"test file {f.name}: {f.path} does not exist or is not a file")
    return list(files)


def _positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EvalSettings:
    seeds: tuple = PAPER_SEEDS          # one sampled answer per prompt and seed
    temperature: float = 1.0
    top_k: int = 0                      # 0 = off
    top_p: float = 1.0                  # 1.0 = off
    greedy: bool = False                # argmax decoding (then every seed gives the same answer)
    max_new_tokens: int = 256
    max_prompt_length: Optional[int] = None   # cut the instruction/context part of longer prompts
    max_seq_length: Optional[int] = None      # teacher-forced loss: truncate samples to this
    num_samples: int = 0                # first N records of each file (0 = all)
    batch_size: int = 8                 # prompts per generate() call and per loss micro batch
    template: str = "dolly"
    eos_id: Optional[int] = None        # stop token (None: the tokenizer's eos)
    response_loss: bool = True          # also compute the teacher-forced loss of the references
    fields: str = "dolly"               # JSON keys: dolly | alpaca | instruction=K,context=K,response=K

    def __post_init__(self):
        from megatron_csd.data.templates import check_template

        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.seeds:
            raise ValueError("give at least one seed")
        for seed in self.seeds:
            _positive_int("seed", seed, minimum=0)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy for argmax), got {self.temperature!r}")
        _positive_int("top_k", self.top_k, minimum=0)
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _positive_int("max_new_tokens", self.max_new_tokens)
        for name in ("max_prompt_length", "max_seq_length"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name), minimum=2)
        _positive_int("num_samples", self.num_samples, minimum=0)
        _positive_int("batch_size", self.batch_size)
        check_template(self.template)
        if self.eos_id is not None:
            _positive_int("eos_id", self.eos_id, minimum=0)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["seeds"] = list(self.seeds)
        return out
