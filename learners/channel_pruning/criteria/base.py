"""The criterion registry and what the criteria share.

A criterion decides which channels each group keeps: a function
`(learner, model, graph, counts, data) -> (keep, overrides, notes)` where `keep[group id]` are
the sorted channel indices kept (groups left out keep all), `overrides[layer][weight]` replaces
a weight before the surgery slices it (e.g. a refitted kernel), and `notes` go into the run's
info. `register_criterion(name)` adds one; the `criterion` setting names it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pocketflow.errors import PocketFlowError

CRITERIA: dict[str, Callable] = {}


def register_criterion(name: str):
    """Decorator: make `fn` the criterion called `name`."""
    def add(fn):
        CRITERIA[name] = fn
        return fn
    return add


def pruned(graph, counts: dict) -> list:
    """The groups that lose channels at `counts`."""
    return [g for g in graph.prunable if counts[g.id] < g.size]


def kernel(graph, layer) -> np.ndarray:
    """A producer's weight that maps its input channels to its output channels (Conv/Dense
    kernel, pointwise kernel of a separable, as registered for a user's layer), output axis last."""
    rules = graph.weight_rules.get(layer.name, {})
    for w in layer.weights:
        axes = {side: axis for axis, side in rules.get(w.name, {}).items()}
        if "out" in axes and ("in" in axes or "in*" in axes):
            return np.moveaxis(w.numpy(), axes["out"], -1)
    raise PocketFlowError(f"layer '{layer.name}' ({type(layer).__name__}) has no weight with both an "
                          "input and an output channel axis; see its register_layer weights")


def calibration(learner, data):
    """The learner's `calibration_images` training images (and labels), a seeded sample."""
    if data is None or not len(getattr(data, "x_train", ())):
        raise PocketFlowError(f"criterion '{learner.cfg['criterion']}' needs training images")
    n = min(learner.cfg["calibration_images"], len(data.x_train))
    idx = np.sort(np.random.default_rng(learner.seed).permutation(len(data.x_train))[:n])
    return data.x_train[idx], data.y_train[idx]


def run(model, tensors: list, x: np.ndarray, batch: int = 64):
    """Yield the values of `tensors` (KerasTensors of `model`) batch by batch (inference mode)."""
    import keras
    import tensorflow as tf
    probe = keras.Model(model.inputs, tensors)
    fn = tf.function(lambda b: probe(b, training=False), reduce_retracing=True)
    for i in range(0, len(x), batch):
        out = fn(tf.constant(x[i:i + batch]))
        yield [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]
