"""Distillation: the teacher term really reaches the student's gradients, for every learner."""
import numpy as np
import pytest
import tensorflow as tf

from conftest import learner_cfg
from pocketflow.learners import LEARNERS, Budget
from pocketflow.training import DistillationHook


class _Const:
    """A 'teacher' returning fixed logits (keeps the test about the loss, not a model)."""

    def __init__(self, logits):
        self.logits = tf.constant(logits)
        self.trainable = False

    def __call__(self, x, training=False):
        return self.logits


@pytest.mark.parametrize("weight, temperature", [(0.5, 4.0), (1.0, 2.0), (0.0, 3.0)])
def test_gradient_wrt_student_logits_is_weight_T_times_softmax_difference(weight, temperature):
    rng = np.random.default_rng(0)
    s = tf.Variable(rng.normal(size=(8, 10)).astype("float32"))
    t = rng.normal(size=(8, 10)).astype("float32")
    hook = DistillationHook(_Const(t), temperature=temperature, weight=weight)
    with tf.GradientTape() as tape:
        loss = hook.loss(None, None, s)
    g = tape.gradient(loss, s).numpy()
    p_s = tf.nn.softmax(s / temperature).numpy()
    p_t = tf.nn.softmax(t / temperature).numpy()
    expected = weight * temperature * (p_s - p_t) / len(t)
    np.testing.assert_allclose(g, expected, atol=1e-6)
    if weight:
        assert np.abs(g).max() > 1e-4  # the term is in the gradient path, not just computed


def test_kl_is_zero_when_student_equals_teacher():
    t = np.random.default_rng(1).normal(size=(4, 10)).astype("float32")
    loss = DistillationHook(_Const(t), 4.0, 1.0).loss(None, None, tf.constant(t))
    assert abs(float(loss)) < 1e-6


def test_distillation_learner_trains_a_smaller_student(trained_seed_cnn, small_data):
    from pocketflow import metrics as M
    cfg = learner_cfg("distillation", student="seed_cnn", student_args={"filters": 4}, fine_tune={
        "epochs": 2, "batch_size": 64, "verbose": False, "learning_rate": 0.003})
    learner = LEARNERS.get("distillation")(cfg)
    params = learner.default_params(trained_seed_cnn)
    assert {"distill/temperature", "distill/weight"} <= set(learner.search_space(trained_seed_cnn))
    ratio = learner.predict_ratio(trained_seed_cnn, params, "params")
    assert ratio > 2.5
    comp = learner.compress(trained_seed_cnn, params, small_data, Budget(epochs=2))
    assert learner.measure(trained_seed_cnn, comp, "params") == pytest.approx(ratio)
    acc = M.accuracy(comp.deploy, small_data.x_test, small_data.y_test)
    assert acc > 0.6  # far above chance (0.1): it learned from teacher + labels
    # the teacher is untouched: still trainable, same weights
    assert trained_seed_cnn.trainable and all(w.trainable for w in trained_seed_cnn.layers if w.weights)


def test_distill_enabled_adds_search_dimensions_to_any_learner():
    cfg = learner_cfg("full_precision", distill={"enabled": True})
    learner = LEARNERS.get("full_precision")(cfg)
    from pocketflow.zoo import build_model
    space = learner.full_space(build_model("seed_cnn", (28, 28, 1), 10))
    assert "distill/temperature" in space and "distill/weight" in space and "fine_tune/learning_rate" in space
    hooks = learner.fine_tune_hooks(object.__new__(_Const), {"distill/temperature": 7.0, "distill/weight": 0.3})
    assert hooks[0].t == 7.0 and hooks[0].weight == 0.3
