"""Every registered learner honours the Learner contract.

search_space gives named dimensions; compress leaves its input alone and returns a Compressed
whose deploy model is plain Keras (no PocketFlow wrapper layers), converts to TFLite, and
whose TFLite output matches its Keras output.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import learner_cfg

keras = pytest.importorskip("keras")

from pocketflow.export import to_tflite, verify_tflite  # noqa: E402
from pocketflow.hpo.space import Categorical, Float, Int  # noqa: E402
from pocketflow.learners import LEARNERS, Budget, Compressed  # noqa: E402

#: the least a learner needs in its config section to be constructed
REQUIRED = {"chain": {"steps": ["weight_sparsity", "uniform_quant"]}}


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        for sub in getattr(layer, "_layers", []) or []:
            yield sub


@pytest.mark.parametrize("name", LEARNERS.names())
def test_learner_conformance(name, trained_seed_cnn, small_data):
    model = trained_seed_cnn
    learner = LEARNERS.get(name)(learner_cfg(name, **REQUIRED.get(name, {})))
    space = learner.search_space(model)
    assert isinstance(space, dict)
    for k, dim in space.items():
        assert isinstance(k, str) and k, k
        assert isinstance(dim, (Float, Int, Categorical)), (k, dim)
    params = learner.default_params(model)
    if hasattr(learner, "check"):
        learner.check(model)

    before = [w.copy() for w in model.get_weights()]
    comp = learner.compress(model, params, small_data, Budget(steps=3))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "input model was modified"
    assert isinstance(comp, Compressed)
    assert isinstance(comp.size_bytes, int) and comp.size_bytes > 0
    custom = [type(layer).__name__ for layer in _all_layers(comp.deploy)
              if type(layer).__module__.startswith("pocketflow")]
    assert not custom, f"deploy model of '{name}' holds PocketFlow layers: {custom}"

    x = small_data.x_test[:32]
    keras_out = np.asarray(comp.deploy(x, training=False))
    diff = verify_tflite(comp.deploy, to_tflite(comp.deploy), x)
    assert diff <= 1e-3 * (1 + np.abs(keras_out).max()), (name, diff)


#: learners whose points can be projected, with a target they reach on the seed CNN
PROJECTABLE = {"weight_sparsity": ("compression", 3.0), "uniform_quant": ("compression", 6.0),
               "nonuniform_quant": ("compression", 10.0), "chain": ("compression", 8.0),
               "channel_pruning": ("flops", 1.5)}


@pytest.mark.parametrize("name", [n for n in PROJECTABLE if n in LEARNERS])
def test_projection_meets_the_target_from_both_sides(name, trained_seed_cnn):
    """A point that compresses too little is pushed to the target, one that compresses far
    more is pulled back to it (within 1%, or above where bits are integers)."""
    model = trained_seed_cnn
    metric, ratio = PROJECTABLE[name]
    learner = LEARNERS.get(name)(learner_cfg(name, **REQUIRED.get(name, {})))
    space = learner.search_space(model)
    for extreme in (0.0, 1.0):  # least and most compressing corner of the space
        point = {}
        for k, dim in space.items():
            if isinstance(dim, Categorical):
                point[k] = dim.choices[int(extreme) * (len(dim.choices) - 1)]
            else:
                lo, hi = dim.low, dim.high
                least_first = "sparsity" not in k  # high sparsity, low bits/ratios compress most
                v = (lo if least_first else hi) if extreme else (hi if least_first else lo)
                point[k] = int(v) if isinstance(dim, Int) else float(v)
        point = {**learner.default_params(model), **point}
        got = learner.predict_ratio(model, learner.project(model, point, metric, ratio), metric)
        integer = all(isinstance(d, Int) for d in space.values())
        assert got >= ratio * 0.99, (name, extreme, got)
        assert got <= ratio * (1.6 if integer else 1.05), (name, extreme, got)
