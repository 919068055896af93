"""Conformance suites shipped with the package (as `optuna.testing` is): subclass one in your own
tests and a new learner, optimizer or kernel transform is checked against the same contract as
the built-in ones. Needs pytest."""
from pocketflow.testing.learners import LearnerTestCase  # noqa: F401
from pocketflow.testing.transforms import TransformTestCase  # noqa: F401
