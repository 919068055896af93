"""Channel-selection criteria of channel pruning, one module each, registered by name
(`base.register_criterion`); importing this package registers the built-in ones, in this order."""
from pocketflow.learners.channel_pruning.criteria import norm  # noqa: F401  (l1, l2)
from pocketflow.learners.channel_pruning.criteria import reconstruction  # noqa: F401
from pocketflow.learners.channel_pruning.criteria import discrimination  # noqa: F401
from pocketflow.learners.channel_pruning.criteria.base import CRITERIA, register_criterion  # noqa: F401
