"""Kernel transforms (kernel -> kernel in a wrapped layer's forward pass) and the activation
fake quant: one module per method. Importing this package registers every class with Keras
under its `pocketflow>` name, which loading a saved `.keras` model needs."""
from pocketflow.learners.transforms.activation import ActivationQuant, PooledQuant, defers_quant
from pocketflow.learners.transforms.base import PKG, KernelTransform, ste
from pocketflow.learners.transforms.codebook import Codebook, kmeans_1d, nearest_index
from pocketflow.learners.transforms.fake_quant import FakeQuant
from pocketflow.learners.transforms.mask import (MagnitudeMask, ceil_count, expected_zeros, magnitude_mask,
                                                 parse_pattern)

__all__ = ["PKG", "KernelTransform", "ste", "MagnitudeMask", "magnitude_mask", "parse_pattern", "expected_zeros",
           "ceil_count", "FakeQuant", "Codebook", "kmeans_1d", "nearest_index", "ActivationQuant", "PooledQuant",
           "defers_quant"]
