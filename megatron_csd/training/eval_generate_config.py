"""The ``eval_generate`` config section: generation-based evaluation during training.

Every ``interval`` iterations the trainer samples answers for the first ``num_samples`` records
of the held-out instruction JSONL ``data`` (``max_new_tokens`` each, one answer per seed in
``seeds``) and logs ROUGE-L, exact match, the teacher-forced response loss, generated length and
diversity to metrics.jsonl / TensorBoard (see generation_eval.py). Kept apart from config.py so
that file stays small; it imports nothing from the training package (config.py imports it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


def _flag(name: str, help_text: str) -> dict:
    return {"flag": name, "help": help_text}


def parse_seeds(value) -> tuple[int, ...]:
    """``"10,20,30"`` / ``[10, 20]`` / ``10`` -> (10, 20, 30); ValueError otherwise."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        seeds = tuple(int(item) for item in items if str(item) != "")
    except ValueError:
        raise ValueError(f"eval_generate.seeds must be comma-separated integers (e.g. 10,20,30), "
                         f"got {value!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"eval_generate.seeds must be distinct integers >= 0, got {value!r}")
    return seeds


@dataclass
class EvalGenerateConfig:
    interval: int = field(default=0, metadata=_flag("--eval-generate-interval", "sample and score held-out answers every N steps (0 = off)"))
    data: Optional[str] = field(default=None, metadata=_flag("--eval-generate-data", "held-out instruction JSONL (Dolly fields)"))
    max_new_tokens: int = field(default=64, metadata=_flag("--eval-generate-max-new-tokens", "tokens generated per answer"))
    seeds: str = field(default="10", metadata=_flag("--eval-generate-seeds", "comma-separated sampling seeds, e.g. 10,20,30,40,50"))
    num_samples: int = field(default=32, metadata=_flag("--eval-generate-num-samples", "first N records of the data (0 = all)"))

    def __post_init__(self):
        for name in ("interval", "max_new_tokens", "num_samples"):
            value = getattr(self, name)
            minimum = 1 if name == "max_new_tokens" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"eval_generate.{name} must be an integer >= {minimum}, got {value!r}")
        self.seeds = ",".join(str(s) for s in parse_seeds(self.seeds))
        if self.interval and not self.data:
            raise ValueError("eval_generate.interval is set but eval_generate.data is not: pass "
                             "--eval-generate-data HELD_OUT.jsonl (Dolly fields)")
