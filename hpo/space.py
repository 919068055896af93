"""Search-space dimensions that learners declare and optimizers sample."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from pocketflow.errors import PocketFlowError
from pocketflow.registry import did_you_mean


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def clip(self, v):
        return float(min(self.high, max(self.low, v)))

    def center(self):
        return float((self.low * self.high) ** 0.5 if self.log else (self.low + self.high) / 2)


@dataclass(frozen=True)
class Int:
    low: int
    high: int
    log: bool = False

    def clip(self, v):
        return int(min(self.high, max(self.low, round(v))))

    def center(self):
        return int(round((self.low * self.high) ** 0.5 if self.log else (self.low + self.high) / 2))


@dataclass(frozen=True)
class Categorical:
    choices: tuple

    def clip(self, v):
        return v if v in self.choices else self.choices[0]

    def center(self):
        return self.choices[0]


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


def build_space(learner, model, search_cfg: dict) -> tuple[dict, dict]:
    """(space, fixed): the learner's space (its own dimensions and distillation's) with the
    `search.space` overrides applied and the `search.fix` dimensions taken out. `search.space`
    may also name a dimension of `learner.optional_space` (e.g. `fine_tune/learning_rate`) to
    switch it on; `null` there keeps the learner's default range."""
    space, optional = dict(learner.full_space(model)), learner.optional_space(model)
    known = {**optional, **space}

    def check_name(key, name):
        if name not in known:
            names = list(known)
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise PocketFlowError(f"search.{key}: unknown dimension '{name}'{did_you_mean(name, names)}; "
                                  f"learner '{learner.name}' searches: {shown}")

    for name, spec in (search_cfg.get("space") or {}).items():
        check_name("space", name)
        space[name] = _override(name, spec, known[name])
    fixed = {}
    for name, value in (search_cfg.get("fix") or {}).items():
        check_name("fix", name)
        fixed[name] = value
        space.pop(name, None)
    return space, fixed


def _override(name: str, spec: Any, default: Dimension) -> Dimension:
    if spec is None:
        return default
    try:
        dim = from_config(spec, default)
    except ValueError as e:
        raise PocketFlowError(f"search.space.{name}: {e}") from None
    if isinstance(dim, (Float, Int)) and not dim.low < dim.high:
        raise PocketFlowError(f"search.space.{name}: low must be below high, got {list(spec)}")
    if isinstance(dim, (Float, Int)) and dim.log and dim.low <= 0:
        raise PocketFlowError(f"search.space.{name}: a log-scale range must be > 0, got {list(spec)}")
    if isinstance(dim, Categorical) and not dim.choices:
        raise PocketFlowError(f"search.space.{name}: no choices given")
    return dim


def complete_point(space: dict, point: dict) -> dict:
    """`point` on `space`: its values clipped into their dimensions, every missing dimension at its
    center (a log range's geometric mean: a learner's default learning rate); keys off the space dropped."""
    return {name: (d.clip(point[name]) if name in point else d.center()) for name, d in space.items()}


BRANCH = "method"  # a categorical dimension whose choices prefix the dimensions that belong to them


def branches(space: dict) -> dict[str, list[str]] | None:
    """A conditional space ({choice: its dimensions}, plus "" for those every point has), or None
    when `space` has no `method` dimension or no dimension under a choice's name (`<choice>/...`)."""
    d = space.get(BRANCH)
    if not isinstance(d, Categorical):
        return None
    out: dict[str, list[str]] = {"": [], **{str(c): [] for c in d.choices}}
    for name in space:
        if name != BRANCH:
            out[next((c for c in out if c and name.startswith(c + "/")), "")].append(name)
    return out if any(out[str(c)] for c in d.choices) else None
