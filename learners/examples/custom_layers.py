"""Custom layers: how a user's own layer tells the learners what its channels and weights are.

Every learner needs to know two things about a layer it did not ship with: channel pruning,
how the channels of its last axis flow through it (else it is opaque and the channels next to
it are kept); weight sparsity and quantization, which weight is its kernel and how to compute
the layer with a transformed one (else its weights stay as they are). One call declares both:
`pocketflow.learners.register_layer` (topology.py). Importing this module registers the two
layers below (a config does it with `model.imports: [pocketflow.learners.examples.custom_layers]`):

- `ChannelScale`: y = x * gamma, one weight per channel: "channelwise", the default rule
  (every weight sliced on its last axis with the channels) needs nothing else.
- `GainConv2D`: a convolution with a learned per-output-channel gain, y = conv(x, k) * g + b:
  a "producer" whose kernel rows are input channels and whose kernel columns, gain and bias are
  output channels (`weights`), whose width is `filters`, and whose kernel is compressible
  (`kernel="kernel"`, `forward=gain_conv` recomputes the layer with a transformed kernel).

tests/test_custom_layer.py runs both through channel pruning (exact keep-all surgery, pruned
equals the masked original, save/reload), weight sparsity and uniform 8-bit quantization.
"""
from __future__ import annotations

import keras

from pocketflow.learners import register_layer

PACKAGE = "pocketflow_examples"


@keras.saving.register_keras_serializable(PACKAGE)
class ChannelScale(keras.layers.Layer):
    """Multiplies each channel by its own learned factor."""

    def build(self, input_shape):
        self.gamma = self.add_weight(name="gamma", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.gamma


@keras.saving.register_keras_serializable(PACKAGE)
class GainConv2D(keras.layers.Layer):
    """A 'same'-padded 2-D convolution whose outputs are scaled by a learned gain per channel."""

    def __init__(self, filters: int, kernel_size: int = 3, strides: int = 1, **kw):
        super().__init__(**kw)
        self.filters, self.kernel_size, self.strides = int(filters), int(kernel_size), int(strides)

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, input_shape[-1], self.filters),
                                      initializer="glorot_uniform")  # first: the kernel
        self.gain = self.add_weight(name="gain", shape=(self.filters,), initializer="ones")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        return gain_conv(self, x, self.kernel)

    def compute_output_shape(self, input_shape):
        h, w = (None if d is None else -(-d // self.strides) for d in input_shape[1:3])
        return (input_shape[0], h, w, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "strides": self.strides}


def gain_conv(layer: GainConv2D, x, kernel):
    """GainConv2D's output with `kernel` in place of its own (the wrapper passes the
    pruned-, sparsified- or fake-quantized kernel)."""
    y = keras.ops.conv(x, kernel, strides=layer.strides, padding="same")
    return y * layer.gain + layer.bias


register_layer(ChannelScale, "channelwise")
register_layer(GainConv2D, "producer", width="filters",
               weights={"kernel": {-2: "in", -1: "out"}, "gain": {-1: "out"}, "bias": {-1: "out"}},
               kernel="kernel", forward=gain_conv)
