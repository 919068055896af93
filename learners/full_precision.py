"""`full_precision`: no compression, just (fine-)training. The baseline every learner builds on."""
from __future__ import annotations

import keras

from pocketflow.learners.base import Budget, Compressed, Learner, register


def clone(model):
    """An independent copy of a Keras model with the same weights."""
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    return m


@register("full_precision")
class FullPrecision(Learner):
    metrics = ()

    def search_space(self, model) -> dict:
        return self.optional_space(model)  # nothing to compress: only the fine-tune can be tuned

    def max_ratio(self, model, metric: str) -> float:
        return 1.0

    def predict_ratio(self, model, params, metric):
        return 1.0

    def compress(self, model, params, data, budget: Budget, hooks=()) -> Compressed:
        from pocketflow import metrics as M
        m = clone(model)
        hist = self.fine_tune(m, data, budget, teacher=model, hooks=hooks, params=params)
        return Compressed(model=m, deploy=m, size_bytes=M.float_bytes(m), history=hist)
