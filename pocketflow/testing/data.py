"""A small deterministic dataset for conformance suites: no download, learnable in seconds.

Each of 10 classes is a fixed random 28x28 template; images are templates plus noise, so a small
CNN reaches high accuracy in a couple of epochs and compression visibly costs accuracy.
"""
from __future__ import annotations

import numpy as np


def synthetic_dataset(n_train: int = 2000, n_test: int = 500, classes: int = 10, noise: float = 0.35,
                      seed: int = 0):
    from pocketflow.data import Dataset
    rng = np.random.default_rng(seed)
    templates = rng.random((classes, 28, 28, 1), dtype=np.float32)

    def draw(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        x = templates[y] + noise * rng.standard_normal((n, 28, 28, 1)).astype(np.float32)
        return np.clip(x, 0, 1).astype(np.float32), y

    x, y = draw(n_train)
    n_val = n_train // 10
    x_te, y_te = draw(n_test)
    return Dataset(name="synthetic", x_train=x[n_val:], y_train=y[n_val:], x_val=x[:n_val], y_val=y[:n_val],
                   x_test=x_te, y_test=y_te, num_classes=classes)
