"""Compression learners. Importing this package registers the built-in ones."""
from pocketflow.learners.base import (LEARNERS, Budget, Compressed, Learner, register,  # noqa: F401
                                      validate_learner_section)
from pocketflow.learners.topology import register_layer  # noqa: F401
from pocketflow.learners import (full_precision, weight_sparsity, uniform_quant,  # noqa: F401,E402
                                 nonuniform_quant, channel_pruning, distillation, chain, auto)  # (register)
