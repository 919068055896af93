"""`nonuniform_quant`: per-layer codebooks (Deep Compression weight sharing, Han et al. 2016).

Why non-uniform: weights are bell-shaped, so 2^b shared values placed by k-means fit them
better than a uniform b-bit grid at the same index cost. Each kernel gets a `Codebook`
transform: centroids initialised by 1-D k-means (from a linear start), evenly spaced (`linear`)
or at quantiles, weights tied to their centroid in the forward pass, each centroid trained with
the sum of its weights' gradients, and weights re-assigned to the nearest centroid every
`refresh_every` steps (the kernel keeps a straight-through gradient so it can drift across
cluster borders).

With `keep_zero` (default), a layer that arrives already pruned keeps its zeros on a fixed,
untrainable zero code, so sparsity survives and the layer still has <= 2^bits distinct values.

Size: per kernel ceil(bits * n / 8) bytes of indexes + 2^bits * 4 bytes of codebook (or a
sparse layout when the layer was pruned, see `accounting.storage`); the packed export writes
exactly that. The TFLite export is float32, but with 2^bits distinct values per kernel it
gzips far below the float model.
"""
from __future__ import annotations

from dataclasses import replace

from pocketflow.schema import Field, non_negative
from pocketflow.learners.base import register
from pocketflow.learners.kernels import is_depthwise, kernel_variable
from pocketflow.learners.transform_learner import COMMON_PARAMS, TransformLearner, per_layer_field
from pocketflow.learners.transforms import Codebook
from pocketflow.learners.wrap import wrappers
from pocketflow.training import TrainHook


def _bits_1_4(v):
    if not isinstance(v, int) or isinstance(v, bool):
        return "must be an integer"
    return None if 1 <= v <= 4 else "must be between 1 and 4"


def _fraction(v):
    return None if 0 <= v <= 1 else "must be in [0, 1]"


class CodebookRefresh(TrainHook):
    """Every `every` optimizer steps: move each kernel weight by its centroid's displacement
    since the last assignment (the centroids train much faster than single weights; without
    this, re-assigning from stale weights scrambles the clusters), then re-assign each weight
    to its nearest centroid. Stops after step `until`, so the end of fine-tuning trains the
    centroids on fixed assignments and recovers from the last re-assignment."""

    def __init__(self, targets, every: int, until: int):
        self.targets, self.every, self.until = targets, every, until  # targets: (wrapper, transform index)

    def after_step(self, step: int) -> None:
        if not (self.every and step % self.every == 0 and step <= self.until):
            return
        for w, i in self.targets:
            t, kv = w.transforms[i], kernel_variable(w.layer)
            kv.assign(kv.numpy() + t.drift())
            t.refresh(w.kernel_input(i))


@register("nonuniform_quant")
class NonuniformQuant(TransformLearner):
    """k-means codebooks of 2^bits shared values per layer, fine-tuned."""
    dim = "bits"
    value_field = "bits"
    params = {
        "bits": Field(int, 4, check=_bits_1_4, help="index bits per weight, 1..4 (2^bits shared values)"),
        "per_layer": per_layer_field(_bits_1_4, "bits"),
        "init": Field(str, "kmeans", choices=("kmeans", "linear", "quantile"),
                      help="centroid initialisation (linear: evenly spaced, lower-entropy codes)"),
        "keep_zero": Field(bool, True, help="exact zeros (pruned weights) keep a fixed zero code"),
        "refresh_every": Field((int, type(None)), None, check=non_negative,
                               help="steps between re-assignments (0: never; default: about 10 per run)"),
        "refresh_until": Field(float, 0.5, check=_fraction,
                               help="fraction of the fine-tuning after which assignments stay fixed"),
        **COMMON_PARAMS,
    }

    def check_value(self, v):
        return _bits_1_4(v)

    def dimension(self, name, layer):
        from pocketflow.hpo.space import Int
        return Int(1, 4)

    def scale(self, params, alpha):
        """bits = 1 + round(alpha * (b - 1)): alpha = 0 puts every layer at 1 bit."""
        alpha = min(1.0, max(0.0, alpha))
        return {k: (1 + int(round(alpha * (v - 1))) if k.startswith("bits/") else v) for k, v in params.items()}

    def relax(self, params, beta):
        """bits = b + round(beta * (4 - b)): beta = 1 puts every layer at 4 bits."""
        beta = min(1.0, max(0.0, beta))
        return {k: (int(v) + int(round(beta * (4 - int(v)))) if k.startswith("bits/") else v) for k, v in params.items()}

    def make_transforms(self, name, layer, value, existing):
        return [Codebook(int(value), bool(self.cfg.get("keep_zero", True)), self.cfg.get("init", "kmeans"),
                         depthwise=is_depthwise(layer), name=f"{name}_codebook")]

    def train_hooks(self, wrapped, values, data, budget):
        targets = [(w, max(i for i, t in enumerate(w.transforms) if isinstance(t, Codebook)))
                   for w in wrappers(wrapped) if w.name in values]
        total = self.total_steps(self.cfg["fine_tune"], data, budget)
        every = self.cfg.get("refresh_every")
        every = max(1, total // 10) if every is None else int(every)
        return [CodebookRefresh(targets, every, int(float(self.cfg.get("refresh_until", 0.5)) * total))]

    def describe(self, rep, value):
        return replace(rep, kind="codebook", bits=int(value))
