"""Hyperparameter search: ask/tell optimizers over learner search spaces, stored in Optuna studies."""
from pocketflow.hpo.optimizers import OPTIMIZERS  # noqa: F401  (gp, tpe, random, grid registered)
from pocketflow.hpo import parego  # noqa: F401,E402  (nsga2 registered)
