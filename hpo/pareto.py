"""Pareto mode (`search.objective: pareto`): one search for the whole accuracy-vs-ratios front.

The study is multi-objective: a trial is told [val_acc, the measured ratio of each objective
metric], all maximized (a ratio is a compression or speed-up factor). Accuracy is always value 0,
so the single-objective readers (best_trial, history, the progress lines, the report) read
`t.values[0]` in both modes, and `best/` is the most accurate feasible trial in both.

- `target.ratio` is a floor, not a goal: a point predicted under it is projected up onto it, a
  point above it stays where the optimizer put it (projecting every point onto the floor would
  collapse the front onto one ratio); a measured ratio under it makes the trial infeasible
  (`trial.set_constraint`, which Optuna's TPE and NSGA-II read themselves).
- Optuna's pruners are single-objective (`Trial.report` raises in a multi-objective study), and
  pruning on accuracy alone would stop exactly the high-ratio end of the front. So a trial is
  wrapped (`ParetoTrial`): its curve is a user attribute, and it is pruned only against finished
  trials that compress at least as much in every objective (by its predicted ratios).
"""
from __future__ import annotations

import math

import optuna

from pocketflow.errors import ConfigError, PocketFlowError

ACCURACY = "accuracy"


def validate(d: dict, source: str) -> None:
    """Config checks of pareto mode (one line each, before anything is trained)."""
    from pocketflow.targets import FILE_METRICS, METRICS, canonical
    s, t = d["search"], d["target"]
    if s["objective"] != "pareto":
        return
    objs = s["objectives"]
    if not objs:
        raise ConfigError(f"{source}: 'search.objective: pareto' needs 'search.objectives', e.g. "
                          "[accuracy, download_size]")
    names = [canonical(o)[0] if isinstance(o, str) else o for o in objs]
    for o in names:
        if o != ACCURACY and o not in METRICS:
            from pocketflow.registry import did_you_mean
            raise ConfigError(f"{source}: 'search.objectives' has unknown objective {o!r}"
                              f"{did_you_mean(str(o), [ACCURACY, *METRICS])}; choose from: "
                              f"{', '.join([ACCURACY, *METRICS])}")
    if names[0] != ACCURACY or names.count(ACCURACY) != 1 or len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"{source}: 'search.objectives' must be accuracy first, then one or more distinct "
                          f"target metrics, got {objs!r}")
    if any(m in FILE_METRICS for m in names) and "tflite" not in d["export"]["formats"]:
        raise ConfigError(f"{source}: 'search.objectives' {names!r} are measured on the shipped TFLite file; "
                          "add tflite to export.formats")
    if d["search"]["optimizer"] == "grid":
        raise ConfigError(f"{source}: 'search.optimizer: grid' is single-objective here; pareto mode uses "
                          "tpe, nsga2, gp or random")
    s["objectives"] = names
    if t["ratio"] is None:  # without a floor the target metric only labels the progress lines
        t["metric"] = names[1]


class Objectives:
    """What a trial is told and how its point is projected: one value (accuracy at the target),
    or the pareto vector. Built from the `search:` section; `multi` is False in single mode."""

    def __init__(self, search_cfg: dict):
        self.cfg = search_cfg
        self.multi = search_cfg.get("objective") == "pareto"
        self.metrics = list(search_cfg["objectives"][1:]) if self.multi else []

    @property
    def directions(self):
        return ["maximize"] * (1 + len(self.metrics)) if self.multi else None

    def identity(self) -> dict:
        """The study's identity entry (a pareto study is not shared with a single-objective one)."""
        return {"objectives": [ACCURACY, *self.metrics] if self.multi else None}

    def optimizer(self, name: str, space: dict, seed: int, trials: int, options: dict):
        from pocketflow.hpo.optimizers import make_optimizer
        if self.multi and name == "gp":
            from pocketflow.hpo.parego import ParEGO
            return ParEGO(space, seed=seed, trials=trials, options=options)
        return make_optimizer(name, space, seed, trials, options)

    def project(self, learner, model, raw: dict, metric: str, aim: float) -> dict:
        """Single mode: onto the target. Pareto: onto the floor only from below."""
        if self.multi and learner.predict_ratio(model, raw, metric) >= aim:
            return raw
        return learner.project(model, raw, metric, aim)

    def predict(self, search, params: dict) -> None:
        """Pareto with pruning: the point's predicted ratios, which pick its pruning peers (every
        rank predicts: a latency prediction may measure across ranks)."""
        if not (self.multi and search.optimizer.prunes and self.cfg["pruner"] != "none"):
            return
        pred = {}
        for m in self.metrics:
            try:
                pred[m] = float(search.learner.predict_ratio(search.model, params, m))
            except PocketFlowError:  # not predictable before training: never pruned on it
                pass
        if search.world.is_root:
            search.trial.set_user_attr("predicted_ratios", pred)

    def values(self, search, acc: float, ratio: float, comp):
        """What the study is told for a completed trial (rank 0); pareto records `ratios` too."""
        if not self.multi:
            return float(acc)
        ratios = {m: ratio if m == search.metric else float(search.learner.measure(search.model, comp, m))
                  for m in self.metrics}
        search.trial.set_user_attr("ratios", ratios)
        return [float(acc), *(ratios[m] for m in self.metrics)]

    def wrap(self, trial, search):
        """The trial the search runs: pareto mode's own pruning rule (see ParetoTrial)."""
        if not self.multi:
            return trial
        wrapped = ParetoTrial.__new__(ParetoTrial)  # the same trial (no second sampler pass)
        wrapped.__dict__.update(trial.__dict__)
        wrapped._pf = (self.cfg["pruner"], self.metrics, int(self.cfg["trials"]))
        return wrapped

    def summary(self, trials) -> dict:
        """The search summary's `pareto` entry: the non-dominated feasible trials ({} single)."""
        if not self.multi:
            return {}
        return {"pareto": {"objectives": [ACCURACY, *self.metrics], "points": self.cfg["pareto_points"],
                           "front": front_rows(trials, self.metrics)}}


# -- the front ---------------------------------------------------------------------------------------
def dominates(a, b) -> bool:
    """Whether vector `a` is at least as good as `b` everywhere and better somewhere (maximizing)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: list[tuple[int, list]]) -> list[int]:
    """Keys of the (key, values) points no other point dominates; of equal vectors the first."""
    out, seen = [], set()
    for k, v in points:
        if tuple(v) in seen or any(dominates(w, v) for _, w in points):
            continue
        seen.add(tuple(v))
        out.append(k)
    return out


def front_rows(trials, metrics: list[str]) -> list[dict]:
    """The front as rows (trial, val_acc, ratios, projected params), most accurate first."""
    from pocketflow.hpo.study import is_feasible
    ok = {t.number: t for t in trials if is_feasible(t) and t.values and len(t.values) == 1 + len(metrics)}
    keep = non_dominated([(n, list(t.values)) for n, t in sorted(ok.items())])
    rows = [{"trial": n, "val_acc": ok[n].values[0], "ratios": dict(zip(metrics, ok[n].values[1:])),
             "params": ok[n].user_attrs.get("projected") or dict(ok[n].params)} for n in keep]
    return sorted(rows, key=lambda r: (-r["val_acc"], r["trial"]))


def spread(rows: list[dict], k: int | None) -> list[dict]:
    """The `k` rows spread most evenly along the front (all when k is None or covers it): the two
    ends first (most accurate, most compressed), then greedily the row farthest from those chosen,
    in objectives normalized to [0, 1]. Deterministic, so a resumed run picks the same points."""
    if k is None or k >= len(rows):
        return rows
    vecs = [[r["val_acc"], *r["ratios"].values()] for r in rows]
    lo, hi = [min(c) for c in zip(*vecs)], [max(c) for c in zip(*vecs)]
    norm = [[(x - a) / (b - a) if b > a else 0.0 for x, a, b in zip(v, lo, hi)] for v in vecs]
    chosen = [0] + ([len(rows) - 1] if k > 1 else [])  # rows are sorted most accurate first
    while len(chosen) < k:
        chosen.append(max((i for i in range(len(rows)) if i not in chosen),
                          key=lambda i: (min(math.dist(norm[i], norm[j]) for j in chosen), -i)))
    return [rows[i] for i in sorted(chosen)]


# -- pruning -----------------------------------------------------------------------------------------
def _pruned(trials, me, rule: str, metrics: list[str], budget: int) -> bool:
    """`me` is below the median (median) or the top third (halving) of the curves, at its last step,
    of the feasible finished trials that measured at least its predicted ratio in every objective."""
    import numpy as np

    from pocketflow.hpo.study import is_feasible
    from pocketflow.targets import TOLERANCE
    curve = me.user_attrs.get("curve") or {}
    if rule == "none" or not curve:
        return False
    step = max(curve, key=int)
    pred = me.user_attrs.get("predicted_ratios") or {}
    peers = [t.user_attrs["curve"][step] for t in trials
             if t.number != me.number and is_feasible(t) and step in (t.user_attrs.get("curve") or {})
             and all((t.user_attrs.get("ratios") or {}).get(m, 0) >= pred.get(m, math.inf) * (1 - TOLERANCE)
                     for m in metrics)]
    if len(peers) < max(2, min(5, budget // 5)):
        return False
    return curve[step] < float(np.quantile(peers, 0.5 if rule == "median" else 2 / 3))


class ParetoTrial(optuna.Trial):
    """A trial of a multi-objective study that takes `report` and answers `should_prune`."""
    _pf: tuple  # (pruner, ratio metrics, budget)

    def report(self, value: float, step: int) -> None:
        curve = dict(self.user_attrs.get("curve") or {})
        curve.setdefault(str(int(step)), float(value))
        self.set_user_attr("curve", curve)

    def should_prune(self) -> bool:
        me = self.study._storage.get_trial(self._trial_id)
        return _pruned(self.study.get_trials(deepcopy=False), me, *self._pf)
