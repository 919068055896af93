"""Hyperparameter search: ask/tell optimizers over learner search spaces, stored in Optuna studies."""
import importlib

from pocketflow.registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")

try:
    importlib.import_module("pocketflow.hpo.optimizers")  # registers gp, tpe, random, grid
except ModuleNotFoundError as e:
    if e.name != "pocketflow.hpo.optimizers":
        raise
