"""`learner: auto`: which learner (or chain) a target metric calls for, decided at config load.

Speed targets (flops, latency) prune channels: a narrower dense model is faster everywhere. A
bytes target (compression) sparsifies and then quantizes the survivors, which shrinks bytes most
for the accuracy lost; a parameter-count target only sparsifies (fewer bits do not lower it).
"""
from __future__ import annotations

import copy

from pocketflow.errors import PocketFlowError
from pocketflow.learners.base import LEARNERS

#: per target metric, the candidates in order of preference: the first whose learners are all
#: registered is taken
_SIZE_CHAIN = {"name": "chain", "steps": ["weight_sparsity", "uniform_quant"]}
AUTO_LEARNERS = {
    "flops": [{"name": "channel_pruning"}],
    "latency": [{"name": "channel_pruning"}],
    "compression": [_SIZE_CHAIN, {"name": "weight_sparsity"}, {"name": "uniform_quant"}],
    "params": [{"name": "weight_sparsity"}],  # quantizing leaves the count unchanged: pure accuracy loss
}


def _names_in(section: dict) -> list[str]:
    return [section["name"]] + list(section.get("steps", ()))


def choose_learner(metric: str) -> dict:
    """The `learner:` section `learner: auto` stands for (a fresh dict the caller may merge into)."""
    if metric not in AUTO_LEARNERS:
        raise PocketFlowError(f"learner: auto has no choice for target metric '{metric}'; "
                              f"choose from: {', '.join(AUTO_LEARNERS)}")
    for cand in AUTO_LEARNERS[metric]:
        if all(n in LEARNERS for n in _names_in(cand)):
            return copy.deepcopy(cand)
    wanted = " or ".join("+".join(n for n in _names_in(c) if n != "chain") for c in AUTO_LEARNERS[metric])
    raise PocketFlowError(f"learner: auto for target metric '{metric}' needs {wanted}, none of which is installed")


def resolve_auto(section: dict, metric: str) -> dict:
    """A raw `learner:` section with `name: auto` replaced by `choose_learner(metric)`; the
    user's shared keys (fine_tune, distill) are kept (a chain hands them to its steps)."""
    if not isinstance(section, dict) or section.get("name") != "auto":
        return section
    return {**choose_learner(metric), **{k: v for k, v in section.items() if k != "name"}}
