"""What a kernel layer is, and how its kernel is laid out.

Every transform, the wrapper and the size accounting agree on one layout: a kernel's output
channels are its last axis (depthwise: the last two, one channel per (in, multiplier)), and
`as_matrix` views it as rows = channels, columns = that channel's weights in C order. A leaf
module (Keras, NumPy and the layer registry), so transforms and wrappers can both build on it.
"""
from __future__ import annotations

import keras
import numpy as np


def custom_kernel(layer):
    """(kernel attribute, forward) of a layer registered with a compressible kernel
    (`topology.register_layer(..., kernel=, forward=)`), else None."""
    from pocketflow.learners.topology import spec_of
    spec = spec_of(layer)
    return None if spec is None or spec.forward is None else (spec.kernel, spec.forward)


def _builtin_call(layer) -> bool:
    """The layer computes what its Keras base class does (a subclass overriding `call` may not)."""
    L = keras.layers
    return any(type(layer).call is base.call for base in (L.Conv2D, L.DepthwiseConv2D, L.Dense))


def is_kernel_layer(layer) -> bool:
    """Conv2D, DepthwiseConv2D or Dense (channels-last, not already Keras-quantized or LoRA), or
    a layer registered with a compressible kernel."""
    L = keras.layers
    if custom_kernel(layer) is not None:
        return True
    if not isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense)) or not _builtin_call(layer):
        return False
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    return not getattr(layer, "quantization_mode", None) and not getattr(layer, "lora_enabled", False)


def is_depthwise(layer) -> bool:
    return isinstance(layer, keras.layers.DepthwiseConv2D)


def kernel_variable(layer):
    """The kernel *variable* (Dense/Conv2D keep it in `_kernel`; `kernel` may be a computed view)."""
    custom = custom_kernel(layer)
    if custom is not None:
        return getattr(layer, custom[0])
    var = getattr(layer, "_kernel", None)
    return var if var is not None else layer.kernel


def reduce_axes(ndim: int, depthwise: bool) -> tuple:
    """Axes to reduce for per-output-channel statistics (depthwise: one channel per (in, mult))."""
    return (0, 1) if depthwise else tuple(range(ndim - 1))


def num_channels(shape, depthwise: bool) -> int:
    return int(shape[-2] * shape[-1]) if depthwise else int(shape[-1])


def as_matrix(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """Rows = output channels, columns = that channel's weights in kernel (C) order."""
    return kernel.reshape(-1, num_channels(kernel.shape, depthwise)).T


def from_matrix(mat: np.ndarray, shape) -> np.ndarray:
    return np.ascontiguousarray(mat.T).reshape(shape)
