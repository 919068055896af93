"""Every built-in learner passes the package's conformance suite (pocketflow.testing.LearnerTestCase),
on the small real Fashion-MNIST sample and the briefly trained seed CNN shared by the suite."""
from __future__ import annotations

import pytest

from pocketflow.testing import LearnerTestCase


class BuiltIn(LearnerTestCase):
    @pytest.fixture(scope="class")
    @classmethod
    def data(cls, small_data):
        return small_data

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, trained_seed_cnn):
        return trained_seed_cnn


class TestFullPrecision(BuiltIn):
    learner = "full_precision"


class TestWeightSparsity(BuiltIn):
    learner, target = "weight_sparsity", ("packed_size", 3.0)


class TestUniformQuant(BuiltIn):
    learner, target, overshoot = "uniform_quant", ("packed_size", 6.0), 1.6


class TestNonuniformQuant(BuiltIn):
    learner, target, overshoot = "nonuniform_quant", ("packed_size", 10.0), 1.6


class TestChain(BuiltIn):
    learner, section = "chain", {"steps": ["weight_sparsity", "uniform_quant"]}
    target, overshoot = ("packed_size", 8.0), 1.6  # integer bits: the ratio moves in steps


class TestChannelPruning(BuiltIn):
    learner, target = "channel_pruning", ("flops", 1.5)


class TestDistillation(BuiltIn):
    learner = "distillation"


class TestAuto(BuiltIn):
    """A method search: the corners of its space are its first and last method."""
    learner, section = "auto", {"methods": [["weight_sparsity", "uniform_quant"], ["uniform_quant"]]}
    target, overshoot = ("packed_size", 6.0), 1.6
