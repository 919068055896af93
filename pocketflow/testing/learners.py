"""`LearnerTestCase`: the contract every learner honours, as a pytest class to subclass.

A new learner's test is three lines::

    from pocketflow.testing import LearnerTestCase

    class TestMyLearner(LearnerTestCase):
        learner = "my_learner"                 # its registered name
        section = {"strength": 0.5}            # keys of its `learner:` section (optional)
        target = ("packed_size", 2.0)          # a target it can meet (optional; None: no projection)

The suite checks what the search, the API and the exporter rely on without knowing a learner's
insides: named dimensions, a config section that validates, `compress` leaving its input alone and
returning a plain deployable Keras model whose TFLite output matches, `max_ratio` and `project`
meeting a target from both sides, and the predicted ratio agreeing with the measured one.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest

from pocketflow.testing.data import synthetic_dataset


class LearnerTestCase:
    #: the registered learner name
    learner: ClassVar[str] = ""
    #: learner-specific keys of the `learner:` section
    section: ClassVar[dict] = {}
    #: (metric, ratio) the learner reaches on the test model; None if it cannot be projected
    target: ClassVar[tuple[str, float] | None] = None
    #: how far above the target a projected point may land (integer knobs such as bits overshoot)
    overshoot: ClassVar[float] = 1.05
    #: measured / predicted ratio may differ by this factor (exact accounting: 1.0 + rounding)
    prediction_tolerance: ClassVar[float] = 0.02

    # -- fixtures a subclass may override -------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def data(cls):
        """A small deterministic dataset (no download): 10 classes of 28x28x1 images."""
        return synthetic_dataset()

    @pytest.fixture(scope="class")
    @classmethod
    def model(cls, data):
        """The zoo's seed CNN trained for a few hundred steps (accuracy well above chance)."""
        import keras

        from pocketflow.training import Trainer
        from pocketflow.zoo import build_model
        keras.utils.set_random_seed(0)
        m = build_model("seed_cnn", data.input_shape, data.num_classes)
        Trainer(m, data, {"epochs": 2, "batch_size": 64, "optimizer": "adam", "learning_rate": 2e-3,
                          "schedule": "constant", "verbose": False}).fit()
        return m

    def make_learner(self):
        """A learner built from a validated `learner:` section, as the API builds it."""
        from pocketflow.config import load_config
        from pocketflow.learners import LEARNERS
        sec = {"name": self.learner, "fine_tune": {"verbose": False, "epochs": 1, "batch_size": 64},
               **self.section}
        cfg = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"}, "learner": sec})
        return LEARNERS.get(self.learner)(cfg["learner"])

    # -- the contract ---------------------------------------------------------------------------
    def test_registered_under_its_name(self):
        from pocketflow.learners import LEARNERS
        assert self.learner in LEARNERS, f"'{self.learner}' is not registered (use @register)"
        assert LEARNERS.get(self.learner).name == self.learner

    def test_unknown_key_is_refused_in_one_line(self):
        from pocketflow.config import load_config
        from pocketflow.errors import ConfigError
        with pytest.raises(ConfigError) as e:
            load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                         "learner": {"name": self.learner, **self.section, "no_such_key_zz": 1}})
        assert "no_such_key_zz" in str(e.value) and "\n" not in str(e.value)

    def test_search_space_has_named_dimensions(self, model):
        from pocketflow.hpo.space import Categorical, Float, Int
        learner = self.make_learner()
        space = learner.search_space(model)
        assert isinstance(space, dict)
        for k, dim in space.items():
            assert isinstance(k, str) and k, k
            assert isinstance(dim, (Float, Int, Categorical)), (k, dim)
        params = learner.default_params(model)
        assert isinstance(params, dict)

    def test_compress_leaves_the_input_alone_and_deploys_plain_keras(self, model, data):
        from pocketflow.export import to_tflite, verify_tflite
        from pocketflow.learners import Budget, Compressed
        from pocketflow.learners.wrap import all_layers
        learner = self.make_learner()
        learner.check(model)
        before = [w.copy() for w in model.get_weights()]
        comp = learner.compress(model, learner.default_params(model), data, Budget(steps=3))
        assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "input model modified"
        assert isinstance(comp, Compressed)
        assert isinstance(comp.size_bytes, int) and comp.size_bytes > 0
        custom = [type(layer).__name__ for layer in all_layers(comp.deploy)
                  if type(layer).__module__.startswith("pocketflow")]
        assert not custom, f"the deploy model holds PocketFlow layers: {custom}"
        x = data.x_test[:32]
        keras_out = np.asarray(comp.deploy(x, training=False))
        diff = verify_tflite(comp.deploy, to_tflite(comp.deploy), x)
        assert diff <= 1e-3 * (1 + np.abs(keras_out).max()), diff

    def test_projection_meets_the_target_from_both_sides(self, model):
        """The least and the most compressing corner of the space both end within the target band."""
        if self.target is None:
            pytest.skip("no target declared for this learner")
        from pocketflow.hpo.space import Categorical, Int
        metric, ratio = self.target
        learner = self.make_learner()
        assert learner.max_ratio(model, metric) >= ratio
        space = learner.search_space(model)
        for corner in (0, 1):
            point = {k: (d.choices[corner * (len(d.choices) - 1)] if isinstance(d, Categorical)
                         else (d.low, d.high)[corner]) for k, d in space.items()}
            point = {k: int(v) if isinstance(space[k], Int) else v for k, v in point.items()}
            projected = learner.project(model, {**learner.default_params(model), **point}, metric, ratio)
            got = learner.predict_ratio(model, projected, metric)
            assert ratio * 0.99 <= got <= ratio * self.overshoot, (corner, got)

    def test_predicted_ratio_is_the_measured_one(self, model, data):
        if self.target is None:
            pytest.skip("no target declared for this learner")
        from pocketflow.learners import Budget
        metric, ratio = self.target
        learner = self.make_learner()
        params = learner.project(model, learner.default_params(model), metric, ratio)
        comp = learner.compress(model, params, data, Budget(steps=2))
        predicted, measured = learner.predict_ratio(model, params, metric), learner.measure(model, comp, metric)
        assert abs(measured / predicted - 1) <= self.prediction_tolerance, (predicted, measured)

    def test_unreachable_target_is_refused_before_training(self, model):
        if self.target is None:
            pytest.skip("no target declared for this learner")
        from pocketflow.errors import PocketFlowError
        metric, _ = self.target
        learner = self.make_learner()
        with pytest.raises(PocketFlowError, match="out of reach"):
            learner.check_target(model, metric, learner.max_ratio(model, metric) * 1.5 + 1)
