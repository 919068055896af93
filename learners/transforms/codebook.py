"""Weight sharing: a kernel tied to a codebook of 2^bits trainable values, and 1-D k-means."""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from pocketflow.learners.transforms.base import PKG, KernelTransform


@keras.saving.register_keras_serializable(PKG)
class Codebook(KernelTransform):
    """Weights tied to 2^bits shared values (Deep Compression weight sharing).

    Forward: centroids[indices]. Gradient: each centroid gets the sum of its weights' gradients
    (the gather's gradient); the kernel also gets the straight-through gradient so `refresh`
    can move weights between clusters. A centroid moves much faster than any single weight
    (its gradient is coherent), so before re-assigning, `drift` gives every weight its
    centroid's displacement since the last assignment to follow (see nonuniform_quant).
    (The mean instead of the sum was measured on the seed-table chain: the same with Adam,
    equal with SGD at lr 1e-3, 3 pt worse with SGD at lr 1e-2, so the sum stays.)

    With `keep_zero`, a kernel that arrives with exact zeros (pruned) keeps them on a fixed,
    untrainable zero code; its other weights only map to the remaining 2^bits - 1 centroids,
    so the zero count is preserved exactly.
    """

    def __init__(self, bits: int = 4, keep_zero: bool = True, init: str = "kmeans", **kwargs):
        super().__init__(**kwargs)
        self.bits, self.keep_zero, self.init = int(bits), bool(keep_zero), init

    def build(self, kernel_shape):
        k = 2 ** self.bits
        self.centroids = self.add_weight(name="centroids", shape=(k,), initializer="zeros", trainable=True)
        self.free = self.add_weight(name="free", shape=(k,), initializer="ones", trainable=False)
        self.anchor = self.add_weight(name="anchor", shape=(k,), initializer="zeros", trainable=False)
        self.indices = self.add_weight(name="indices", shape=tuple(kernel_shape), initializer="zeros",
                                       dtype="int32", trainable=False)

    def call(self, kernel, training=None):
        return ops.take(self._values(), ops.convert_to_tensor(self.indices)) + (kernel - ops.stop_gradient(kernel))

    def _values(self):
        return ops.convert_to_tensor(self.centroids) * ops.convert_to_tensor(self.free)

    def codebook(self) -> np.ndarray:
        return np.asarray(self._values())

    @property
    def zero_fixed(self) -> bool:
        return bool(self.free.numpy()[0] == 0)

    def initialize(self, kernel_in: np.ndarray) -> None:
        k = 2 ** self.bits
        zero_fixed = self.keep_zero and bool(np.any(kernel_in == 0))
        values = kernel_in[kernel_in != 0] if zero_fixed else kernel_in.ravel()
        cents = kmeans_1d(values, k - int(zero_fixed), self.init)
        free = np.ones(k, np.float32)
        if zero_fixed:
            cents = np.concatenate([[0.0], cents])
            free[0] = 0
        self.centroids.assign(cents.astype(np.float32))
        self.free.assign(free)
        self.refresh(kernel_in)

    def drift(self) -> np.ndarray:
        """Per weight: how far its centroid moved since the last assignment."""
        return (self.codebook() - self.anchor.numpy())[self.indices.numpy()]

    def refresh(self, kernel_in: np.ndarray) -> None:
        """Re-assign every weight to its nearest centroid (exact zeros to the zero code)."""
        cents = self.codebook()
        start = 1 if self.zero_fixed else 0
        idx = nearest_index(kernel_in.ravel(), cents[start:]) + start
        if start:
            idx[kernel_in.ravel() == 0] = 0
        self.indices.assign(idx.reshape(kernel_in.shape).astype(np.int32))
        self.anchor.assign(cents)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "keep_zero": self.keep_zero, "init": self.init}


def nearest_index(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    order = np.argsort(centroids, kind="stable")
    s = centroids[order]
    pos = np.searchsorted((s[1:] + s[:-1]) / 2, values)
    return order[pos]


def kmeans_1d(values: np.ndarray, k: int, init: str = "kmeans", iters: int = 30) -> np.ndarray:
    """k centroids of 1-D data. 'linear': evenly spaced over min..max, the initialisation Deep
    Compression found best (large weights keep their own centroids; most weights share the few
    central ones, so the codes have low entropy and gzip well); 'kmeans': Lloyd's algorithm from
    that linear start; 'quantile': centroids at the k quantiles (dense regions get more
    centroids). Returns exactly k values (duplicates if data is scarce)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    if v.size == 0:
        return np.zeros(k)
    if init == "quantile":
        return np.quantile(v, (np.arange(k) + 0.5) / k)
    c = np.linspace(v[0], v[-1], k) if k > 1 else np.array([v.mean()])
    if init == "linear":
        return c
    csum = np.concatenate([[0.0], np.cumsum(v)])
    for _ in range(iters):
        cuts = np.searchsorted(v, (c[1:] + c[:-1]) / 2)
        lo, hi = np.concatenate([[0], cuts]), np.concatenate([cuts, [v.size]])
        cnt = hi - lo
        new = np.where(cnt > 0, (csum[hi] - csum[lo]) / np.maximum(cnt, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            break
        c = new
    return c

