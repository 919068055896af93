"""Magnitude pruning: the mask transform and the mask it applies.

`magnitude_mask` decides which weights (or blocks, or N:M groups) go; `expected_zeros` says
how many it will zero from the geometry alone, so learners can predict sizes before training.
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from pocketflow.errors import PocketFlowError
from pocketflow.learners.kernels import as_matrix, from_matrix, num_channels
from pocketflow.learners.transforms.base import PKG, KernelTransform


@keras.saving.register_keras_serializable(PKG)
class MagnitudeMask(KernelTransform):
    """kernel * mask; the mask is raised from outside (`set_sparsity`), e.g. on a schedule."""

    def __init__(self, pattern: str = "unstructured", **kwargs):
        super().__init__(**kwargs)
        self.pattern = pattern
        parse_pattern(pattern)

    def build(self, kernel_shape):
        self.mask = self.add_weight(name="mask", shape=tuple(kernel_shape), initializer="ones",
                                    trainable=False)

    def call(self, kernel, training=None):
        return kernel * ops.convert_to_tensor(self.mask)

    def set_sparsity(self, kernel_in: np.ndarray, sparsity: float) -> None:
        """Prune the smallest |weights| (or blocks / groups) of `kernel_in` that survive so far:
        masks only grow, like TF-MOT's, because pruned weights score 0."""
        prev = self.mask.numpy()
        self.mask.assign(magnitude_mask(kernel_in * prev, sparsity, self.pattern, self.depthwise, prev))

    def get_config(self):
        return {**super().get_config(), "pattern": self.pattern}


def parse_pattern(pattern: str) -> tuple:
    """'unstructured' | 'RxC' (blocks of R output channels x C consecutive weights) | 'N:M'."""
    p = str(pattern).strip().lower()
    try:
        if p == "unstructured":
            return ("unstructured",)
        if "x" in p:
            r, c = (int(v) for v in p.split("x"))
            if r >= 1 and c >= 1:
                return ("unstructured",) if r == c == 1 else ("block", r, c)
        if ":" in p:
            n, m = (int(v) for v in p.split(":"))
            if 1 <= n < m:
                return ("nm", n, m)
    except ValueError:
        pass
    raise PocketFlowError(f"sparsity pattern '{pattern}': use unstructured, RxC blocks (e.g. 1x4) or N:M "
                          "with N < M (e.g. 2:4)")


def ceil_count(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to float noise (0.8 * 100 must be 80, not 81)."""
    return min(n, max(0, math.ceil(round(fraction * n, 6))))


def magnitude_mask(score_kernel: np.ndarray, sparsity: float, pattern: str, depthwise: bool,
                   previous: np.ndarray | None = None) -> np.ndarray:
    """A 0/1 mask pruning exactly ceil(sparsity * units) units with the smallest |values|.

    Units are weights (unstructured), RxC blocks of the channel-by-weights matrix (`as_matrix`),
    or, for N:M, the M-N smallest of every M consecutive weights of a channel (sparsity only
    switches it on; a trailing group shorter than M keeps its N largest). Ties are broken
    towards units that were already pruned, then by position, so the count is exact.
    """
    score = np.abs(score_kernel).astype(np.float64)
    prev = np.ones_like(score) if previous is None else previous.astype(np.float64)
    if sparsity <= 0:
        return np.ones(score.shape, np.float32)
    kind = parse_pattern(pattern)
    if kind[0] == "unstructured":
        flat = score.ravel()
        order = np.lexsort((prev.ravel(), flat))
        mask = np.ones(flat.size, np.float32)
        mask[order[:ceil_count(sparsity, flat.size)]] = 0
        return mask.reshape(score.shape)
    mat, pmat = as_matrix(score, depthwise), as_matrix(prev, depthwise)
    rows, cols = mat.shape
    if kind[0] == "block":
        r, c = kind[1], kind[2]
        R, C = -(-rows // r), -(-cols // c)
        pad = ((0, R * r - rows), (0, C * c - cols))
        real = np.pad(np.ones_like(mat), pad)
        total = np.pad(mat, pad).reshape(R, r, C, c).sum(axis=(1, 3))
        alive = np.pad(pmat, pad).reshape(R, r, C, c).sum(axis=(1, 3))
        mean = total / real.reshape(R, r, C, c).sum(axis=(1, 3))
        order = np.lexsort((alive.ravel(), mean.ravel()))
        keep = np.ones(R * C, np.float32)
        keep[order[:ceil_count(sparsity, R * C)]] = 0
        full = np.kron(keep.reshape(R, C), np.ones((r, c), np.float32))[:rows, :cols]
        return from_matrix(full, score.shape).astype(np.float32)
    n, m = kind[1], kind[2]
    G = -(-cols // m)
    padded = np.pad(mat, ((0, 0), (0, G * m - cols)), constant_values=-1.0)  # padding is pruned first
    groups = padded.reshape(rows, G, m)
    idx = np.argsort(groups, axis=-1, kind="stable")[..., : m - n]
    keep = np.ones_like(groups, dtype=np.float32)
    np.put_along_axis(keep, idx, 0.0, axis=-1)
    return from_matrix(keep.reshape(rows, G * m)[:, :cols], score.shape)


def expected_zeros(shape, sparsity: float, pattern: str, depthwise: bool) -> int:
    """Zeros `magnitude_mask` will produce, from the geometry alone (blocks: an upper bound)."""
    n = int(np.prod(shape))
    if sparsity <= 0:
        return 0
    kind = parse_pattern(pattern)
    if kind[0] == "unstructured":
        return ceil_count(sparsity, n)
    rows = num_channels(shape, depthwise)
    cols = n // rows
    if kind[0] == "block":
        r, c = kind[1], kind[2]
        nb = -(-rows // r) * -(-cols // c)
        return min(n, ceil_count(sparsity, nb) * r * c)
    nn, m = kind[1], kind[2]
    full, tail = divmod(cols, m)
    return rows * (full * (m - nn) + max(0, tail - nn))

