"""Activation fake quantization: the int8 TFLite activations simulated in training.

`ActivationQuant` quantizes a kernel layer's output; `PooledQuant` carries it past a following
max pooling when `defers_quant` says that gives the same values (see `wrap.wrap_model`).
"""
from __future__ import annotations

import keras

from pocketflow.learners.transforms.base import PKG


@keras.saving.register_keras_serializable(PKG)
class ActivationQuant(keras.layers.Layer):
    """Per-tensor asymmetric fake quantization of a layer's output with EMA-tracked min/max.

    The forward pass is tf.quantization.fake_quant_with_min_max_vars: the nudged zero point and
    rounding of TFLite's int8 activations. The gradient is straight-through (identity): the
    op's own gradient also reduces over the activations for min/max gradients nobody uses, which
    made QAT steps of small models ~25% slower, and the ranges follow the data anyway. Ranges
    are set by `calibrate_activations` (running min/max over a few batches), then follow an EMA
    of batch min/max in training; after a ReLU the minimum is 0 and is not measured.
    Uncalibrated, the layer passes values through.
    """

    def __init__(self, bits: int = 8, decay: float = 0.99, nonnegative: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.bits, self.decay, self.nonnegative = int(bits), float(decay), bool(nonnegative)
        self.observing = False

    def build(self, input_shape=None):
        self.lo = self.add_weight(name="min", shape=(), initializer="zeros", trainable=False)
        self.hi = self.add_weight(name="max", shape=(), initializer="zeros", trainable=False)
        self.seen = self.add_weight(name="seen", shape=(), initializer="zeros", trainable=False)

    def call(self, x, training=None):
        import tensorflow as tf
        fq = tf.quantization.fake_quant_with_min_max_vars
        if not (training or self.observing):
            lo, hi = tf.convert_to_tensor(self.lo.value), tf.convert_to_tensor(self.hi.value)
            return tf.cond(self.seen.value > 0, lambda: fq(x, lo, hi, num_bits=self.bits), lambda: tf.identity(x))
        # after a ReLU the minimum is 0: one pass over the activations fewer
        bmin = tf.constant(0.0) if self.nonnegative else tf.minimum(tf.reduce_min(x), 0.0)
        bmax = tf.maximum(tf.reduce_max(x), 0.0)
        seen = self.seen.value
        if self.observing:  # running min/max over the calibration batches
            lo, hi = tf.minimum(self.lo.value, bmin), tf.maximum(self.hi.value, bmax)
        else:
            d = self.decay
            lo, hi = d * self.lo.value + (1 - d) * bmin, d * self.hi.value + (1 - d) * bmax
        # the first batch ever sets the range; ranges are statistics, not trained
        lo = tf.stop_gradient(seen * lo + (1 - seen) * bmin)
        hi = tf.stop_gradient(seen * hi + (1 - seen) * bmax)
        self.lo.assign(lo)
        self.hi.assign(hi)
        self.seen.assign(1.0)
        bits = self.bits

        @tf.custom_gradient
        def quantize(v):  # straight-through: the gradient passes unchanged (ranges track the data)
            return fq(v, lo, hi, num_bits=bits), lambda g: g
        return quantize(x)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "decay": self.decay, "nonnegative": self.nonnegative}


@keras.saving.register_keras_serializable(PKG)
class PooledQuant(keras.layers.Layer):
    """A max pooling whose output carries the activation fake quant of the ReLU kernel layer
    before it (see `wrap_model`). Max pooling commutes with a monotone per-tensor quantizer and
    keeps the maximum, so the forward pass is bit-identical to quantizing the kernel layer's
    output (int8 TFLite also pools in that layer's output scale) at a quarter of the elements:
    in the seed CNN the activation fake quant was a third of a QAT step."""

    def __init__(self, layer, act_quant, **kwargs):
        if isinstance(layer, dict):
            layer = keras.layers.deserialize(layer)
        kwargs.setdefault("name", layer.name)
        super().__init__(**kwargs)
        self.layer = layer
        self.act_quant = keras.layers.deserialize(act_quant) if isinstance(act_quant, dict) else act_quant

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        if not self.act_quant.built:
            self.act_quant.build(None)
            self.act_quant.built = True
        self.built = True

    def call(self, inputs, training=None):
        return self.act_quant(self.layer(inputs), training=training)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "layer": keras.layers.serialize(self.layer),
                "act_quant": keras.layers.serialize(self.act_quant)}


def defers_quant(pool) -> bool:
    """A max pooling whose windows cover its input (strides <= pool size), so its maximum is the
    maximum of what it pools."""
    L = keras.layers
    if not isinstance(pool, (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)):
        return False
    return all(int(s) <= int(p) for s, p in zip(pool.strides, pool.pool_size))

