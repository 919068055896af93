"""`half_precision`: store the largest weight tensors as float16, the rest as float32.

An example of the Learner contract, written from the README section "Write your own learner":
one searchable dimension (`fraction`: the share of the weights stored in float16, largest tensors
first), an exact size prediction, `scale`/`relax` so the search can project any point onto a
compression target, and a plain Keras deploy model (weights rounded through float16).
"""
from __future__ import annotations

import numpy as np

from pocketflow.hpo.space import Float
from pocketflow.learners import Budget, Compressed, Learner, register
from pocketflow.schema import Field


def _unit(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


@register("half_precision")
class HalfPrecision(Learner):
    params = {"fraction": Field(float, 1.0, check=_unit, help="share of the weights stored as float16")}
    metrics = ("packed_size",)

    # -- which tensors go to float16 ------------------------------------------------------------
    @staticmethod
    def _halved(model, fraction: float) -> set[int]:
        """Indices of the weight tensors stored as float16: the largest first, up to `fraction`."""
        sizes = [int(np.prod(w.shape)) for w in model.weights]
        budget, chosen = fraction * sum(sizes), set()
        for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
            if sizes[i] <= budget + 1e-9:
                chosen.add(i)
                budget -= sizes[i]
        return chosen

    def _bytes(self, model, fraction: float) -> int:
        half = self._halved(model, fraction)
        return sum(int(np.prod(w.shape)) * (2 if i in half else 4) for i, w in enumerate(model.weights))

    # -- search ---------------------------------------------------------------------------------
    def search_space(self, model) -> dict:
        return {"fraction": Float(0.0, 1.0)}

    def default_params(self, model) -> dict:
        return {"fraction": self.cfg["fraction"]}

    def predict_ratio(self, model, params, metric):
        if metric != "packed_size":
            return super().predict_ratio(model, params, metric)  # refuses the metric
        return 4 * sum(int(np.prod(w.shape)) for w in model.weights) / self._bytes(model, params["fraction"])

    def scale(self, params, alpha):
        return {**params, "fraction": 1.0 - alpha * (1.0 - params["fraction"])}

    def relax(self, params, beta):
        return {**params, "fraction": (1.0 - beta) * params["fraction"]}

    # -- compression ----------------------------------------------------------------------------
    def compress(self, model, params, data, budget: Budget, hooks=()) -> Compressed:
        from pocketflow.learners.full_precision import clone
        m = clone(model)
        history = self.fine_tune(m, data, budget, teacher=model, hooks=hooks, params=params)
        half = self._halved(m, params["fraction"])
        m.set_weights([w.astype(np.float16).astype(np.float32) if i in half else w
                       for i, w in enumerate(m.get_weights())])
        return Compressed(model=m, deploy=m, size_bytes=self._bytes(m, params["fraction"]),
                          history=history, info={"float16_tensors": len(half)})
