"""Search strategies behind one small interface; every trial is recorded in an Optuna study.

The study (SQLite in the run directory, or any SQLAlchemy URL) is the single record of the
search: resume, parallel workers and optuna-dashboard all read it. An optimizer only decides
which point a new trial gets:

- Optuna strategies (tpe, random, grid) draw the point with their sampler inside `study.ask`
  and read past trials from the study themselves, so `tell` has nothing to do.
- scikit-optimize's GP proposes the point outside Optuna; a pass-through sampler hands it to
  `study.ask`, so the trial is recorded exactly like the others, and finished trials are fed
  back with `tell`. `sync` replays the study, which rebuilds the GP on resume and keeps it
  current with the results of other workers.
"""
from __future__ import annotations

import abc
import math
import warnings
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pocketflow.errors import PocketFlowError
from pocketflow.hpo.space import BRANCH, Categorical, Dimension, Float, Int, branches
from pocketflow.io import to_builtin
from pocketflow.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")  # name -> Optimizer class; plugins add theirs


def distributions(space: dict[str, Dimension]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distributions of a space (what the study stores next to every param)."""
    out = {}
    for name, d in space.items():
        if isinstance(d, Float):
            out[name] = FloatDistribution(float(d.low), float(d.high), log=d.log)
        elif isinstance(d, Int):
            out[name] = IntDistribution(int(d.low), int(d.high), log=d.log)
        else:
            out[name] = CategoricalDistribution(tuple(to_builtin(list(d.choices))))
    return out


def suggest(trial: optuna.Trial, name: str, d: Dimension):
    """One dimension's value for `trial`, define-by-run (an enqueued point's value if it has one)."""
    if isinstance(d, Float):
        return trial.suggest_float(name, float(d.low), float(d.high), log=d.log)
    if isinstance(d, Int):
        return trial.suggest_int(name, int(d.low), int(d.high), log=d.log)
    return trial.suggest_categorical(name, tuple(to_builtin(list(d.choices))))


def initial_points(trials: int) -> int:
    """Random start-up trials before a model-based optimizer takes over (same for GP and TPE)."""
    return max(3, min(10, trials // 4))


class Optimizer(abc.ABC):
    """Chooses the point of each new trial in an Optuna study.

    `ask` starts a RUNNING trial holding the next point (an enqueued point, e.g. the re-run of an
    interrupted trial, always goes first); `tell` learns from one finished trial, with its value
    already mapped to "higher is better"; `sync` tells every finished trial not told yet.
    """
    name: ClassVar[str] = "base"
    #: whether trials may be stopped early on intermediate values (a GP wants full-budget values)
    prunes: ClassVar[bool] = True

    def __init__(self, space: dict[str, Dimension], seed: int = 0, trials: int = 10, options: dict | None = None):
        if not space:
            raise PocketFlowError("the search space is empty (every dimension is fixed); "
                                  "set search.optimizer: none or free a dimension")
        self.space, self.seed, self.trials = dict(space), int(seed), int(trials)
        self.options = dict(options or {})
        self._told: set[int] = set()

    @abc.abstractmethod
    def sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler the study is loaded with (it draws the params inside `study.ask`)."""

    def capacity(self) -> int | None:
        """The most distinct points this optimizer can propose (a grid's size), or None."""
        return None

    def info(self) -> dict:
        """What the run summary records about this optimizer."""
        return {"name": self.name, "seed": self.seed, "prunes": self.prunes}

    def ask(self, study: optuna.Study, pending: Sequence[dict] = ()) -> optuna.Trial:
        """Start a RUNNING trial holding the next point; `pending` = points other trials are running."""
        return study.ask(distributions(self.space))

    def tell(self, params: dict, value: float) -> None:
        """Learn from one finished trial."""

    def sync(self, history: Iterable[tuple[int, dict, float]]) -> int:
        """Tell every (trial number, params, value) not told yet; returns how many were new."""
        n = 0
        for number, params, value in history:
            if number in self._told:
                continue
            self._told.add(number)
            if all(k in params for k in self.space):
                self.tell({k: params[k] for k in self.space}, float(value))
                n += 1
        return n


# -- Optuna samplers -------------------------------------------------------------------------------

@OPTIMIZERS.register("tpe")
class TPE(Optimizer):
    """Optuna's multivariate TPE; the constant liar keeps parallel workers from piling onto one point.

    A conditional space (`learner: auto`: a `method` and each method's dimensions under its name)
    is asked define-by-run: the method first, then only its dimensions, and TPE's `group` mode
    models each method's dimensions apart (a trial of one method says nothing about another's
    per-layer ratios; the flat encoding made every trial carry every method's values)."""
    name = "tpe"

    def __init__(self, space, seed=0, trials=10, options=None):
        super().__init__(space, seed, trials, options)
        self.branches = branches(self.space)

    def sampler(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=initial_points(self.trials),
                                              multivariate=True, constant_liar=True, group=self.branches is not None)

    def ask(self, study, pending=()):
        if self.branches is None:
            return super().ask(study, pending)
        trial = study.ask()
        choice = suggest(trial, BRANCH, self.space[BRANCH])
        for name in self.branches[""] + self.branches[str(choice)]:
            suggest(trial, name, self.space[name])
        return trial

    def info(self):
        return {**super().info(), "n_startup_trials": initial_points(self.trials), "multivariate": True,
                "conditional": self.branches is not None}


@OPTIMIZERS.register("random")
class Random(Optimizer):
    """Uniform (log-uniform where declared) sampling: the baseline every other optimizer must beat."""
    name = "random"

    def sampler(self):
        return optuna.samplers.RandomSampler(seed=self.seed)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its `study.stop()` after the last point: that only works
    inside `study.optimize`, and the search stops on its own budget (`Grid.capacity`)."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


@OPTIMIZERS.register("grid")
class Grid(Optimizer):
    """A full grid over 1-2 dimensions: every choice of a categorical, `points` values of a
    numeric one (log-spaced if declared log). `points` comes from `search.grid_points` if set,
    otherwise the largest count whose grid fits in `search.trials`."""
    name = "grid"
    max_dims: ClassVar[int] = 2

    def __init__(self, space, seed=0, trials=10, options=None):
        super().__init__(space, seed, trials, options)
        if len(self.space) > self.max_dims:
            raise PocketFlowError(
                f"grid search covers at most {self.max_dims} dimensions, the space has {len(self.space)} "
                f"({', '.join(list(self.space)[:4])}{', ...' if len(self.space) > 4 else ''}); "
                "fix the others with search.fix or use tpe/gp")
        numeric = [d for d in self.space.values() if not isinstance(d, Categorical)]
        fixed = math.prod(len(d.choices) for d in self.space.values() if isinstance(d, Categorical))
        points = self.options.get("grid_points")
        if points is None:
            points = int((self.trials / fixed) ** (1 / len(numeric)) + 1e-9) if numeric else 1
        self.points = max(2, int(points))
        self.grid = {name: self._values(d) for name, d in self.space.items()}

    def _values(self, d: Dimension) -> list:
        if isinstance(d, Categorical):
            return to_builtin(list(d.choices))
        if d.log:
            vals = np.geomspace(d.low, d.high, self.points)
        else:
            vals = np.linspace(d.low, d.high, self.points)
        if isinstance(d, Int):
            return sorted({int(round(v)) for v in vals})
        return [float(v) for v in vals]

    def capacity(self):
        return math.prod(len(v) for v in self.grid.values())

    def sampler(self):
        return _GridSampler(self.grid, seed=self.seed)

    def info(self):
        return {**super().info(), "grid": self.grid, "points": self.capacity()}


# -- scikit-optimize --------------------------------------------------------------------------------

class _Proposal(optuna.samplers.BaseSampler):
    """Hands `study.ask` a point computed elsewhere, so the study records it like any trial."""

    def __init__(self):
        self.point: dict[str, Any] = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.point[param_name]


@OPTIMIZERS.register("gp")
class GP(Optimizer):
    """scikit-optimize's Gaussian-process optimizer (expected improvement; log-uniform priors
    where the space says log). Trials still running elsewhere enter the GP as constant lies (the
    worst value seen), so parallel workers do not propose the same point. No pruning: a trial
    stopped early reports a value the GP would mistake for a full-budget one."""
    name = "gp"
    prunes = False

    def __init__(self, space, seed=0, trials=10, options=None):
        super().__init__(space, seed, trials, options)
        self._names = list(self.space)
        self._opt = self._new_opt(self.seed)
        self._x: list[list] = []  # told but not yet fitted: one refit per ask, not per trial
        self._y: list[float] = []
        self._fitted = 0
        self._proposal = _Proposal()

    def _new_opt(self, seed: int):
        from skopt import Optimizer as SkOptimizer
        return SkOptimizer([self._dimension(d) for d in self.space.values()], base_estimator="GP",
                           n_initial_points=initial_points(self.trials), acq_func="EI", random_state=seed)

    @staticmethod
    def _dimension(d: Dimension):
        from skopt.space import Categorical as SkCat, Integer, Real
        if isinstance(d, Float):
            return Real(float(d.low), float(d.high), prior="log-uniform" if d.log else "uniform")
        if isinstance(d, Int):
            return Integer(int(d.low), int(d.high), prior="log-uniform" if d.log else "uniform")
        return SkCat(list(d.choices))

    def sampler(self):
        return self._proposal

    def info(self):
        return {**super().info(), "n_initial_points": initial_points(self.trials), "acq_func": "EI",
                "observations": self._fitted + len(self._x)}

    def tell(self, params, value):
        x = [params[k] for k in self._names]
        if x not in self._opt.space:  # a point of an earlier, wider space (resume after an override)
            return
        self._x.append(x)
        self._y.append(-float(value))  # skopt minimizes

    def _flush(self):
        if self._x:
            self._opt.tell(self._x, self._y)
            self._fitted += len(self._x)
            self._x, self._y = [], []

    def propose(self, pending: Sequence[dict] = ()) -> dict:
        """The GP's next point, with `pending` points entered as constant lies."""
        # tiny matrices: multi-threaded BLAS only thrashes (20x slower on 2 busy cores)
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=1):
            return self._propose(pending)

    def _propose(self, pending):
        self._flush()
        opt = self._opt
        lies = [[p[k] for k in self._names] for p in pending if all(k in p for k in self._names)]
        lies = [x for x in lies if x in opt.space]
        if lies:
            opt = opt.copy(random_state=self.seed + self._fitted + len(lies))
            opt.tell(lies, [max(opt.yi) if opt.yi else 0.0] * len(lies))
        x = opt.ask()
        return {k: to_builtin(v) for k, v in zip(self._names, x)}

    def ask(self, study, pending=()):
        self._proposal.point = self.propose(pending)
        return study.ask(distributions(self.space))


def make_optimizer(name: str, space: dict, seed: int, trials: int, options: dict | None = None) -> Optimizer:
    return OPTIMIZERS.get(name)(space, seed=seed, trials=trials, options=options)
