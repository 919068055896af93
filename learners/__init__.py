"""Compression learners. Importing this package registers the built-in ones."""
import importlib

from pocketflow.learners.base import (LEARNERS, Budget, Compressed, Learner, register,  # noqa: F401
                                      validate_learner_section)
from pocketflow.learners import full_precision  # noqa: F401  (registers)
from pocketflow.learners.topology import register_layer  # noqa: F401

_BUILTINS = ("weight_sparsity", "uniform_quant", "nonuniform_quant", "channel_pruning",
             "distillation", "chain")
for _m in _BUILTINS:
    try:
        importlib.import_module(f"pocketflow.learners.{_m}")
    except ModuleNotFoundError as e:  # modules land one issue at a time
        if e.name != f"pocketflow.learners.{_m}":
            raise
