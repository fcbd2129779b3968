"""`LossConfig`: which distillation objective to compute, and its knobs (validated)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

OBJECTIVES = ("csd", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "dld")
"""csd: Concrete Score Distillation; fkl/rkl: forward/reverse KL; jsd: generalised Jensen-Shannon;
tvd: total variation; skl/srkl: DistiLLM skew (reverse) KL; dld: direct logit distillation (MSE)."""

CSD_WEIGHTS = ("SS", "TS", "ST", "US", "SU", "UU", "TT", "UT", "TU", "MM")
"""Pairs (w1, w2) of weight factors: S student softmax, T teacher softmax, U uniform over the
real vocabulary, M mixture `mix * p + (1 - mix) * q`. The loss is symmetric in the pair."""


@dataclass(frozen=True)
class LossConfig:
    """Distillation objective and its hyper-parameters (see csd-math.md and the README).

    objective:   one of OBJECTIVES.
    weights:     CSD weight pair, one of CSD_WEIGHTS (csd only).
    temperature: tau > 0. csd: reshapes the softmax weights S/T/M only (logit gaps are never
                 divided by tau); KL family: both distributions softmax(z / tau), no tau^2 factor;
                 dld: not used.
    mix:         a in [0, 1], the teacher share of the M weight (csd with MM).
    scale:       multiplies csd and dld (1.0 = the paper's formulas; 0.5 = the authors' code).
    skew:        a in [0, 1] for skl / srkl (DistiLLM uses 0.1).
    beta:        teacher share of the JSD mixture, strictly between 0 and 1.
    """

    objective: str = "csd"
    weights: str = "SS"
    temperature: float = 1.0
    mix: float = 0.15
    scale: float = 1.0
    skew: float = 0.1
    beta: float = 0.5

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LossConfig.objective={self.objective!r} is unknown; choose one of {OBJECTIVES}")
        weights = self.weights.upper() if isinstance(self.weights, str) else self.weights
        if weights not in CSD_WEIGHTS:
            raise ValueError(f"LossConfig.weights={self.weights!r} is unknown; choose one of {CSD_WEIGHTS}")
        object.__setattr__(self, "weights", weights)
        for name in ("temperature", "mix", "scale", "skew", "beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LossConfig.{name} must be a number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"LossConfig.{name} must be finite, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.temperature <= 0:
            raise ValueError(f"LossConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"LossConfig.mix (teacher share of the M weight) must be in [0, 1], got {self.mix}")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"LossConfig.skew must be in [0, 1], got {self.skew}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"LossConfig.beta must be strictly between 0 and 1, got {self.beta}")

    @classmethod
    def from_dict(cls, values: dict) -> "LossConfig":
        """Build from a mapping; unknown keys are an error naming the allowed ones."""
        allowed = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown loss config key(s) {unknown}; allowed keys are {allowed}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
