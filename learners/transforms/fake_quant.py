"""Uniform fake quantization of a kernel (symmetric, narrow range, straight-through gradient)."""
from __future__ import annotations

import keras
import numpy as np
from keras import ops

from pocketflow.learners.kernels import num_channels, reduce_axes
from pocketflow.learners.transforms.base import PKG, KernelTransform, ste


@keras.saving.register_keras_serializable(PKG)
class FakeQuant(KernelTransform):
    """Symmetric b-bit fake quantization, per output channel (or per tensor), STE gradient.

    Scale = max|w| / (2^(b-1) - 1) of the channel, codes in [-(2^(b-1)-1), 2^(b-1)-1]: the
    narrow symmetric range TFLite uses for int8 weights, so at 8 bits the converter's own
    per-channel quantization reproduces the trained values exactly.
    """

    def __init__(self, bits: int = 8, per_channel: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.per_channel = int(bits), bool(per_channel)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def call(self, kernel, training=None):
        axes = reduce_axes(len(kernel.shape), self.depthwise) if self.per_channel else None
        m = ops.max(ops.abs(kernel), axis=axes, keepdims=True)
        s = m / float(self.qmax)
        s = ops.where(s > 0, s, ops.ones_like(s))
        q = ops.clip(ops.round(kernel / s), -float(self.qmax), float(self.qmax)) * s
        return ste(q, kernel)

    def scales(self, kernel_in: np.ndarray) -> np.ndarray:
        """The float32 scale of every output channel, exactly as the forward pass computes it
        (one entry per channel also when quantizing per tensor)."""
        k = kernel_in.astype(np.float32)
        axes = reduce_axes(k.ndim, self.depthwise) if self.per_channel else None
        s = np.max(np.abs(k), axis=axes, keepdims=True) / np.float32(self.qmax)
        s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
        return np.broadcast_to(s, k.shape).reshape(-1, num_channels(k.shape, self.depthwise))[0].copy()

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "per_channel": self.per_channel}
