"""Search-space dimensions that learners declare and optimizers sample."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def clip(self, v):
        return float(min(self.high, max(self.low, v)))


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False

    def clip(self, v):
        return int(min(self.high, max(self.low, round(v))))


@dataclass(frozen=True)
class Categorical:
    choices: tuple

    def clip(self, v):
        return v if v in self.choices else self.choices[0]


Dimension = Float | Int | Categorical


def from_config(spec: Any, default: Dimension | None = None) -> Dimension:
    """YAML override of one dimension: [low, high] (int or float) or {choices: [...]}."""
    if isinstance(spec, dict) and "choices" in spec:
        return Categorical(tuple(spec["choices"]))
    if isinstance(spec, Sequence) and len(spec) == 2 and all(isinstance(v, (int, float)) for v in spec):
        lo, hi = spec
        if isinstance(lo, int) and isinstance(hi, int) and not isinstance(default, Float):
            return Int(lo, hi)
        return Float(float(lo), float(hi), getattr(default, "log", False))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return Categorical(tuple(spec))
    raise ValueError(f"expected [low, high] or a list of choices, got {spec!r}")
