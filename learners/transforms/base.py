"""The kernel-transform contract: kernel -> kernel in a wrapped layer's forward pass.

Keras registers every transform as `pocketflow>ClassName` (`PKG`); saved `.keras` files name
classes that way, so the names must not change when code moves.
"""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

#: the Keras serialization package of every PocketFlow layer
PKG = "pocketflow"


class KernelTransform(keras.layers.Layer):
    """kernel -> kernel in the forward pass; state lives in this layer's variables.

    `initialize(kernel_in)` sets the state from the kernel this transform receives (the output
    of the transforms before it), once, when it is added to a wrapper.
    """

    def __init__(self, depthwise: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.depthwise = bool(depthwise)

    def initialize(self, kernel_in: np.ndarray) -> None:
        pass

    def get_config(self):
        return {**super().get_config(), "depthwise": self.depthwise}


def ste(value, kernel):
    """`value` in the forward pass, identity gradient to `kernel` (straight-through estimator).
    Written as value + (k - k) so the forward value is exactly `value`, bit for bit."""
    return ops.stop_gradient(value) + (kernel - ops.stop_gradient(kernel))
