"""Multi-objective optimizers of pareto mode (hpo.pareto): NSGA-II, and GP through ParEGO.

TPE and random need nothing new: Optuna's TPESampler switches to its multi-objective mode on a
study with several directions, and random sampling ignores values.
"""
from __future__ import annotations

import warnings

import numpy as np
import optuna

from pocketflow.hpo.optimizers import GP, OPTIMIZERS, Optimizer, distributions, initial_points
from pocketflow.hpo.study import holds_slot, is_feasible, is_finished

RHO = 0.05  # the augmentation of the Chebyshev scalarization (Knowles 2006)


@OPTIMIZERS.register("nsga2")
class NSGA2(Optimizer):
    """Optuna's NSGA-II. The population is a quarter of the budget (4-10; Optuna's default of 50
    would leave a 30-trial search random throughout), so a search sees several generations."""
    name = "nsga2"

    def population(self) -> int:
        return max(4, initial_points(self.trials))

    def sampler(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.NSGAIISampler(seed=self.seed, population_size=self.population())

    def info(self):
        return {**super().info(), "population_size": self.population()}


def scalarize(values: list[list[float]], weights, bad: int = 0) -> list[float]:
    """Augmented Chebyshev costs (lower is better) of maximized objective vectors, each objective
    normalized to [0, 1] over the vectors seen (0 = the best seen); `bad` more entries (failed,
    pruned or infeasible trials) get the worst cost."""
    w = np.asarray(weights, dtype=float)
    if values:
        f = np.asarray(values, dtype=float)
        lo, hi = f.min(axis=0), f.max(axis=0)
        c = (hi - f) / np.where(hi > lo, hi - lo, 1.0)
        costs = (c * w).max(axis=1) + RHO * (c * w).sum(axis=1)
    else:
        costs = np.zeros(0)
    worst = float(costs.max()) if len(costs) else 1.0 + RHO
    return [float(v) for v in costs] + [worst] * bad


class ParEGO(GP):
    """scikit-optimize's GP on a scalarization drawn anew for every trial: ParEGO (Knowles 2006).

    A GP models one scalar. A fixed weighted sum of the objectives would aim every trial at one
    spot of the front and cannot reach its concave parts at all; ParEGO's augmented Chebyshev
    scalarization max_i(w_i c_i) + rho sum_i w_i c_i (c: each objective normalized to [0, 1],
    lower is better) reaches every Pareto-optimal point for some weights, and the small rho term
    keeps weakly dominated points from tying with the ones that dominate them. The weights are
    drawn uniformly from the simplex per trial, seeded by (search seed, trials so far), and
    recorded in the trial (`scalarization`), so each GP step aims at another part of the front
    and the run is reproducible. The GP is refitted on every ask: the targets change with w."""
    name = "gp"

    def sync(self, history) -> int:
        return 0  # the values change with each trial's weights: `ask` reads the study itself

    def ask(self, study, pending=()):
        trials = study.get_trials(deepcopy=False)
        n = len(study.directions)
        weights = np.random.default_rng([self.seed, len(trials)]).dirichlet(np.ones(n))
        self._opt = self._new_opt(self.seed + len(trials))
        xs, good, bad = [], [], []
        for t in trials:
            if not (holds_slot(t) and is_finished(t) and all(k in t.params for k in self.space)):
                continue
            x = [t.params[k] for k in self._names]
            if x not in self._opt.space:
                continue
            ok = is_feasible(t) and t.values is not None and len(t.values) == n
            (good if ok else bad).append((x, list(t.values) if ok else None))
        self._x = [x for x, _ in good] + [x for x, _ in bad]
        self._y = scalarize([v for _, v in good], weights, len(bad))
        self._fitted = 0
        self._proposal.point = self.propose(pending)
        trial = study.ask(distributions(self.space))
        trial.set_user_attr("scalarization", {"method": "parego", "weights": [float(v) for v in weights],
                                              "rho": RHO})
        return trial

    def info(self):
        return {**super().info(), "scalarization": "parego (augmented Chebyshev, weights per trial)", "rho": RHO}
