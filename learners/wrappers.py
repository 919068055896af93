"""Kernel transforms: the one mechanism behind weight sparsity, quantization and clustering.

Why one mechanism: the three methods differ only in what they do to a layer's kernel in the
forward pass (mask it, snap it to a grid, tie it to a codebook). A `KernelWrapper` holds the
original Conv2D / DepthwiseConv2D / Dense and a *chain* of `KernelTransform`s; its forward pass
recomputes the layer's op with the transformed kernel (then bias and activation, then an
optional activation fake quant, which `PooledQuant` moves past a following max pooling), so
gradients reach the real kernel and any transform state (centroids), and stacking transforms
composes methods without undoing earlier ones:

    mask -> codebook -> fake quant   zeros stay zero (the codebook keeps exact zeros on a fixed
                                     zero code, symmetric quantization maps 0 to 0), and a fake
                                     quant that follows a codebook quantizes per tensor, so the
                                     layer keeps at most 2^bits distinct values.

`wrap_model` clones a Functional or Sequential model with `keras.models.clone_model` (residual
graphs keep their structure) and never touches the input; wrapping an already wrapped model
appends transforms to the existing chains. `strip_model` bakes the transformed kernels into
plain layers: a normal Keras model that saves, loads and converts to TFLite.

The second half is what every transform learner shares: storage accounting (`KernelRep`,
`storage`), the packed export format (`write_packed` / `read_packed`) and `TransformLearner`,
the base class that wraps, fine-tunes, strips and measures, so `chain` can stack learners.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import keras
import numpy as np
from keras import ops

from pocketflow.schema import Field, non_negative
from pocketflow.errors import PocketFlowError
from pocketflow.learners.base import Compressed, Learner
from pocketflow.registry import did_you_mean

_PKG = "pocketflow"


# -- kernel layers ------------------------------------------------------------------------------

def is_kernel_layer(layer) -> bool:
    """Conv2D, DepthwiseConv2D or Dense (channels-last, not already Keras-quantized or LoRA)."""
    L = keras.layers
    if not isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense)):
        return False
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    return not getattr(layer, "quantization_mode", None) and not getattr(layer, "lora_enabled", False)


def is_depthwise(layer) -> bool:
    return isinstance(layer, keras.layers.DepthwiseConv2D)


def kernel_variable(layer):
    """The kernel *variable* (Dense/Conv2D keep it in `_kernel`; `kernel` may be a computed view)."""
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


def _is_model(layer) -> bool:
    return isinstance(layer, keras.Model)


def kernel_layers(model):
    """(name, kernel layer, wrapper or None) for every kernel layer, nested models included,
    in the model's layer order."""
    for layer in model.layers:
        if isinstance(layer, KernelWrapper):
            yield layer.name, layer.layer, layer
        elif _is_model(layer):
            yield from kernel_layers(layer)
        elif is_kernel_layer(layer):
            yield layer.name, layer, None


def wrappers(model):
    return [w for _, _, w in kernel_layers(model) if w is not None]


def check_cloneable(model) -> None:
    from keras.src.models.functional import Functional
    if not isinstance(model, (Functional, keras.Sequential)):
        raise PocketFlowError(f"model '{model.name}' is a subclassed {type(model).__name__}; compression "
                              "needs a Functional or Sequential Keras model")
    if not model.built:
        raise PocketFlowError(f"model '{model.name}' is not built; give it an Input or call it once")


def sole_consumers(model) -> dict[str, object]:
    """Layer name -> the one layer that consumes its output, for every top-level layer called
    once whose single output feeds exactly one other single-use layer and is not a model output."""
    from keras.src.models.functional import Functional
    if isinstance(model, keras.Sequential):
        ls = model.layers
        return {a.name: b for a, b in zip(ls, ls[1:])}
    if not isinstance(model, Functional):
        return {}
    nodes = [n for d in model._nodes_by_depth.values() for n in d if n.operation is not None and not n.is_input]
    uses, calls = {}, {}
    for n in nodes:
        calls[id(n.operation)] = calls.get(id(n.operation), 0) + 1
        for t in n.input_tensors:
            uses.setdefault(id(t), []).append(n)
    outputs = {id(t) for t in model.outputs}
    out = {}
    for n in nodes:
        if calls[id(n.operation)] != 1 or len(n.output_tensors) != 1 or id(n.output_tensors[0]) in outputs:
            continue
        consumers = uses.get(id(n.output_tensors[0]), [])
        if len(consumers) == 1 and calls[id(consumers[0].operation)] == 1:
            out[n.operation.name] = consumers[0].operation
    return out


def clone_layer(layer):
    return layer.__class__.from_config(layer.get_config())


def clone_graph(model, clone_function, call_function=None):
    """`keras.models.clone_model`, keeping the input layers' names (Keras renames them)."""
    if isinstance(model, keras.Sequential):
        return keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name),
        model.input)
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_function,
                                    call_function=call_function, recursive=True)


# -- transforms ---------------------------------------------------------------------------------

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


def _ste(value, kernel):
    """`value` in the forward pass, identity gradient to `kernel` (straight-through estimator).
    Written as value + (k - k) so the forward value is exactly `value`, bit for bit."""
    return ops.stop_gradient(value) + (kernel - ops.stop_gradient(kernel))


@keras.saving.register_keras_serializable(_PKG)
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


@keras.saving.register_keras_serializable(_PKG)
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
        return _ste(q, kernel)

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


@keras.saving.register_keras_serializable(_PKG)
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


@keras.saving.register_keras_serializable(_PKG)
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


@keras.saving.register_keras_serializable(_PKG)
class KernelWrapper(keras.layers.Layer):
    """A Conv2D / DepthwiseConv2D / Dense whose forward pass uses its transformed kernel.

    Carries the wrapped layer's name, so layer names (and search dimensions) are unchanged.
    """

    def __init__(self, layer, transforms=(), act_quant=None, **kwargs):
        if isinstance(layer, dict):
            layer = keras.layers.deserialize(layer)
        kwargs.setdefault("name", layer.name)
        super().__init__(**kwargs)
        self.layer = layer
        self.transforms = [keras.layers.deserialize(t) if isinstance(t, dict) else t for t in transforms]
        self.act_quant = keras.layers.deserialize(act_quant) if isinstance(act_quant, dict) else act_quant

    @property
    def activation(self):  # the trainer asks the last layer whether it outputs logits
        return self.layer.activation

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build(input_shape)
        shape = tuple(kernel_variable(self.layer).shape)
        for t in self.transforms:
            if not t.built:
                t.build(shape)
                t.built = True
        if self.act_quant is not None and not self.act_quant.built:
            self.act_quant.build(None)
            self.act_quant.built = True
        self.built = True

    def transformed_kernel(self, upto: int | None = None, training=None):
        k = ops.convert_to_tensor(kernel_variable(self.layer))
        for t in self.transforms[:upto]:
            k = t(k, training=training)
        return k

    def kernel_input(self, index: int) -> np.ndarray:
        """The kernel as transform `index` receives it (inference mode), as numpy."""
        return np.asarray(self.transformed_kernel(index, training=False))

    def effective_kernel(self) -> np.ndarray:
        return self.kernel_input(len(self.transforms))

    def call(self, inputs, training=None):
        L = self.layer
        k = self.transformed_kernel(training=training)
        if is_depthwise(L):
            y = ops.depthwise_conv(inputs, k, strides=L.strides, padding=L.padding,
                                   dilation_rate=L.dilation_rate, data_format=L.data_format)
        elif isinstance(L, keras.layers.Conv2D):
            y = L.convolution_op(inputs, k)
        else:
            y = ops.matmul(inputs, k)
        if getattr(L, "bias", None) is not None:
            y = y + L.bias
        if L.activation is not None:
            y = L.activation(y)
        if self.act_quant is not None:
            y = self.act_quant(y, training=training)
        return y

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "layer": keras.layers.serialize(self.layer),
                "transforms": [keras.layers.serialize(t) for t in self.transforms],
                "act_quant": keras.layers.serialize(self.act_quant) if self.act_quant is not None else None}


@keras.saving.register_keras_serializable(_PKG)
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


def _defers_quant(pool) -> bool:
    """A max pooling whose windows cover its input (strides <= pool size), so its maximum is the
    maximum of what it pools."""
    L = keras.layers
    if not isinstance(pool, (L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D)):
        return False
    return all(int(s) <= int(p) for s, p in zip(pool.strides, pool.pool_size))


def activation_quants(model) -> list:
    """Every activation fake quant in `model`: in kernel wrappers and in pooled quants."""
    out = [w.act_quant for w in wrappers(model) if w.act_quant is not None]
    return out + [layer.act_quant for layer in _all_layers(model) if isinstance(layer, PooledQuant)]


# -- wrapping, stripping ------------------------------------------------------------------------

def _pairs(src, dst):
    """(source layer, cloned layer) by name, descending into nested models."""
    for s in src.layers:
        if isinstance(s, keras.layers.InputLayer):
            continue
        d = dst.get_layer(s.name)
        if _is_model(s) and _is_model(d):
            yield from _pairs(s, d)
        else:
            yield s, d


def wrap_model(model, select: Callable[[str], bool],
               make_transforms: Callable[[str, object, list], list],
               output_bits: Callable[[str], int | None] | None = None):
    """A copy of `model` with every selected kernel layer wrapped.

    select(name)                               which kernel layers to wrap / extend
    make_transforms(name, layer, existing)     new transforms, appended after `existing`
    output_bits(name)                          activation fake-quant bits (None: none)

    Already wrapped layers keep their transforms and state; new transforms are initialised
    (`KernelTransform.initialize`) from the kernel they receive, after the weights are copied.
    """
    check_cloneable(model)
    fresh: dict[int, int] = {}
    # a ReLU kernel layer followed only by a max pooling gets its activation quant after the pool
    # (PooledQuant: same values, fewer elements); `pooled` maps pool name -> (kernel name, bits)
    pooled: dict[str, tuple] = {}
    for name, nxt in sole_consumers(model).items():
        layer = model.get_layer(name)
        inner = layer.layer if isinstance(layer, KernelWrapper) else layer
        if isinstance(nxt, PooledQuant):
            pooled[nxt.name] = (name, None)  # already quantized there
        elif (is_kernel_layer(inner) and _defers_quant(nxt) and output_bits is not None and select(name)
              and getattr(layer, "act_quant", None) is None and output_bits(name)
              and inner.activation in (keras.activations.relu, keras.activations.relu6)):
            pooled[nxt.name] = (name, output_bits(name))
    deferred = {k for k, _ in pooled.values()}

    def clone_fn(layer):
        if isinstance(layer, PooledQuant):
            return PooledQuant(clone_layer(layer.layer), clone_layer(layer.act_quant), name=layer.name)
        if layer.name in pooled and pooled[layer.name][1]:
            kname, bits = pooled[layer.name]
            return PooledQuant(clone_layer(layer), ActivationQuant(bits, nonnegative=True, name=f"{kname}_act_quant"))
        wrapped = isinstance(layer, KernelWrapper)
        inner = layer.layer if wrapped else layer
        if not (wrapped or is_kernel_layer(layer)) or not (select(layer.name) or wrapped):
            return clone_layer(layer)
        existing = list(layer.transforms) if wrapped else []
        new = list(make_transforms(layer.name, inner, existing)) if select(layer.name) else []
        act = clone_layer(layer.act_quant) if wrapped and layer.act_quant is not None else None
        bits = (output_bits(layer.name) if output_bits is not None and select(layer.name)
                and layer.name not in deferred else None)
        if act is None and bits:
            relu = inner.activation in (keras.activations.relu, keras.activations.relu6)
            act = ActivationQuant(bits, nonnegative=relu, name=f"{layer.name}_act_quant")
        if not (existing or new or act):
            return clone_layer(layer)
        w = KernelWrapper(clone_layer(inner), [clone_layer(t) for t in existing] + new, act, name=layer.name)
        fresh[id(w)] = len(existing)
        return w

    out = clone_graph(model, clone_fn)
    for src, dst in _pairs(model, out):
        if isinstance(src, KernelWrapper):
            dst.layer.set_weights(src.layer.get_weights())
            for s, d in zip(src.transforms, dst.transforms):
                d.set_weights(s.get_weights())
            if src.act_quant is not None and dst.act_quant is not None:
                dst.act_quant.set_weights(src.act_quant.get_weights())
        elif isinstance(dst, (KernelWrapper, PooledQuant)) and type(src) is not type(dst):
            dst.layer.set_weights(src.get_weights())
        else:
            dst.set_weights(src.get_weights())
    for w in wrappers(out):
        for i in range(fresh.get(id(w), len(w.transforms)), len(w.transforms)):
            w.transforms[i].initialize(w.kernel_input(i))
    return out


def strip_model(model):
    """A plain Keras model with every wrapper's transformed kernel baked into its layer."""
    check_cloneable(model)

    def clone_fn(layer):
        return clone_layer(layer.layer if isinstance(layer, (KernelWrapper, PooledQuant)) else layer)

    out = clone_graph(model, clone_fn)
    for src, dst in _pairs(model, out):
        if isinstance(src, KernelWrapper):
            # + 0.0 turns the -0.0 a mask makes of a negative weight into +0.0: equal values, but
            # float files then hold one zero bit pattern, which compresses far better (a 95%-sparse
            # seed CNN's float TFLite gzips to 6.5 kB instead of 10.8 kB)
            kvar, eff = kernel_variable(src.layer), src.effective_kernel() + np.float32(0.0)
            dst.set_weights([eff if w is kvar else w.numpy() for w in src.layer.weights])
        else:
            dst.set_weights((src.layer if isinstance(src, PooledQuant) else src).get_weights())
    return out


def calibrate_activations(model, x: np.ndarray, batch: int = 64, n_batches: int = 4) -> None:
    """Set the activation fake-quant ranges from a few batches (running min/max, inference mode),
    so quantization is on from the first training step and also without any training."""
    quants = activation_quants(model)
    if not quants or len(x) == 0:
        return
    for q in quants:
        q.observing = True
    try:
        for i in range(min(n_batches, math.ceil(len(x) / batch))):
            model(x[i * batch:(i + 1) * batch], training=False)
    finally:
        for q in quants:
            q.observing = False


# -- storage accounting -------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelRep:
    """How one kernel is stored.

    kind   'float' (float32 values), 'grid' (b-bit codes + a float32 scale per output channel)
           or 'codebook' (b-bit indexes + 2^b float32 shared values).
    sparse the layer was pruned: its `zeros` may be left out of the value stream, with an index
           (see `storage`).
    """
    shape: tuple
    depthwise: bool = False
    zeros: int = 0
    sparse: bool = False
    kind: str = "float"
    bits: int = 32

    @property
    def n(self) -> int:
        return int(np.prod(self.shape))

    @property
    def channels(self) -> int:
        return num_channels(self.shape, self.depthwise)

    @property
    def value_bits(self) -> int:
        return 32 if self.kind == "float" else self.bits

    @property
    def table_bytes(self) -> int:
        return {"float": 0, "grid": 4 * self.channels, "codebook": 4 * 2 ** self.bits}[self.kind]

    @property
    def index_bytes(self) -> int:
        """Bytes of one CSR column index: uint16 when a channel has at most 65536 weights."""
        return 2 if self.n // self.channels <= 65536 else 4


def storage(rep: KernelRep) -> tuple[str, int]:
    """(layout, exact bytes) of the smallest representation of a kernel.

    dense   ceil(value_bits * n / 8) + table
    bitmap  ceil(n / 8) (1 bit per weight: stored or zero) + ceil(value_bits * nnz / 8) + table
    csr     rows = output channels: int32 row pointers 4 * (channels + 1) + a uint16 column index
            per nonzero (uint32 if a channel has > 65536 weights) + ceil(value_bits * nnz / 8) + table
    Sparse layouts are considered only for pruned layers (`rep.sparse`). The bitmap wins up to
    about 94% sparsity for float values; CSR wins above.
    """
    vb, table = rep.value_bits, rep.table_bytes
    options = [("dense", math.ceil(vb * rep.n / 8) + table)]
    if rep.sparse:
        nnz = rep.n - rep.zeros
        values = math.ceil(vb * nnz / 8) + table
        options.append(("bitmap", math.ceil(rep.n / 8) + values))
        options.append(("csr", 4 * (rep.channels + 1) + rep.index_bytes * nnz + values))
    return min(options, key=lambda o: o[1])


def base_reps(model) -> dict[str, KernelRep]:
    """Float, dense representation of every kernel layer (the starting point of predictions)."""
    return {name: KernelRep(tuple(int(d) for d in kernel_variable(layer).shape), is_depthwise(layer))
            for name, layer, _ in kernel_layers(model)}


def actual_rep(w: KernelWrapper) -> KernelRep:
    """The representation of a trained wrapper: what its transform chain guarantees."""
    eff = w.effective_kernel()
    sparse = any(isinstance(t, MagnitudeMask) for t in w.transforms)
    cb = [t for t in w.transforms if isinstance(t, Codebook)]
    fq = [t for t in w.transforms if isinstance(t, FakeQuant)]
    kind, bits = ("codebook", cb[-1].bits) if cb else (("grid", fq[-1].bits) if fq else ("float", 32))
    return KernelRep(eff.shape, is_depthwise(w.layer), int(np.sum(eff == 0)) if sparse else 0,
                     sparse, kind, bits)


def reps_bytes(reps: dict[str, KernelRep]) -> int:
    return sum(storage(r)[1] for r in reps.values())


def ratio_from_reps(model, reps: dict[str, KernelRep], prepared_params: int, metric: str,
                    learner: str) -> float:
    """Predicted `compression` (float bytes / stored bytes) or `params` (params / nonzero params);
    kernels stored as `reps`, every other parameter of the prepared model as float32."""
    from pocketflow import metrics as M
    kernels = sum(r.n for r in reps.values())
    if metric == "compression":
        return M.float_bytes(model) / max(1, reps_bytes(reps) + 4 * (prepared_params - kernels))
    if metric == "params":
        return M.count_params(model) / max(1, prepared_params - sum(r.zeros for r in reps.values() if r.sparse))
    raise PocketFlowError(f"learner '{learner}' cannot target metric '{metric}'")


def package(original, wrapped, history=None, info: dict | None = None) -> Compressed:
    """Strip `wrapped` and account its exact size: kernels as `storage` says, the rest float32."""
    from pocketflow import metrics as M
    deploy = strip_model(wrapped)
    layers, kernel_bytes, kernels, zeros = {}, 0, 0, 0
    for w in wrappers(wrapped):
        rep = actual_rep(w)
        layout, nbytes = storage(rep)
        kernel_bytes, kernels = kernel_bytes + nbytes, kernels + rep.n
        zeros += rep.zeros
        layers[w.name] = {"shape": list(rep.shape), "kind": rep.kind, "bits": rep.bits,
                          "sparsity": round(rep.zeros / rep.n, 6), "zeros": rep.zeros,
                          "layout": layout, "bytes": nbytes}
    total = M.count_params(deploy)
    size = kernel_bytes + 4 * (total - kernels)
    info = {**(info or {}), "layers": layers, "kernel_bytes": kernel_bytes,
            "float_bytes_other": 4 * (total - kernels), "original_float_bytes": M.float_bytes(original)}
    return Compressed(model=wrapped, deploy=deploy, size_bytes=size, info=info, history=history,
                      nonzero_params=total - zeros)


# -- packed export ------------------------------------------------------------------------------
#
# <stem>.bin holds, per wrapped layer in model order, byte-aligned sections and nothing else,
# so its size is exactly the kernels' `storage` bytes; <stem>.json is the manifest (names,
# shapes, kind, bits, layout, section offsets). Conventions:
#   * little-endian; bit-packed codes are LSB-first, contiguous, the last byte zero-padded;
#   * channel c of a weight at flat C-order index i is i % channels (depthwise: in * mult + m);
#   * dense / bitmap list values in kernel C order; bitmap: 1 bit per weight, 1 = stored;
#   * csr: rows are channels, columns a channel's weights in C order; int32 row_ptr[channels+1],
#     uint16 (or uint32) col_idx[nnz], values row by row;
#   * codes: float -> raw float32; grid -> u = q + 2^(b-1) - 1, value = (u - 2^(b-1) + 1) * scale[c],
#     table = float32 scale[channels]; codebook -> u indexes table = float32[2^b] (unused slots 0).


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    codes = np.asarray(codes).ravel()
    if bits == 32:
        return codes.astype("<u4").tobytes()
    b = ((codes.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(b.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    if bits == 32:
        return np.frombuffer(data, "<u4", count).astype(np.uint64)
    b = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: count * bits]
    return (b.reshape(count, bits).astype(np.uint64) << np.arange(bits, dtype=np.uint64)).sum(axis=1)


def _table_and_codes(w: KernelWrapper, rep: KernelRep, values: np.ndarray, channel: np.ndarray):
    if rep.kind == "float":
        return b"", values.astype("<f4").view("<u4")
    if rep.kind == "grid":
        fq = [i for i, t in enumerate(w.transforms) if isinstance(t, FakeQuant)][-1]
        t = w.transforms[fq]
        scales = t.scales(w.kernel_input(fq))
        q = np.round(values / scales[channel]).astype(np.int64)
        return scales.astype("<f4").tobytes(), (q + t.qmax).astype(np.uint64)
    uniq = np.unique(values)
    if uniq.size > 2 ** rep.bits:
        raise PocketFlowError(f"layer '{w.name}': {uniq.size} distinct values do not fit a "
                              f"{rep.bits}-bit codebook")
    table = np.zeros(2 ** rep.bits, np.float32)
    table[: uniq.size] = uniq
    return table.astype("<f4").tobytes(), np.searchsorted(uniq, values).astype(np.uint64)


def encode_layer(w: KernelWrapper) -> tuple[dict, bytes]:
    rep = actual_rep(w)
    layout, nbytes = storage(rep)
    k = w.effective_kernel().astype(np.float32)
    flat, ch = k.ravel(), rep.channels
    sections: list[tuple[str, bytes]] = []
    if layout == "dense":
        pos = np.arange(flat.size)
    elif layout == "bitmap":
        stored = flat != 0
        pos = np.flatnonzero(stored)
        sections.append(("bitmap", np.packbits(stored, bitorder="little").tobytes()))
    else:
        mat = flat.reshape(-1, ch).T  # (channels, weights per channel)
        rows, cols = np.nonzero(mat)
        row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=ch))]).astype("<i4")
        sections.append(("row_ptr", row_ptr.tobytes()))
        sections.append(("col_idx", cols.astype("<u2" if rep.index_bytes == 2 else "<u4").tobytes()))
        pos = cols * ch + rows
    table, codes = _table_and_codes(w, rep, flat[pos], pos % ch)
    sections.append(("codes", pack_bits(codes, rep.value_bits)))
    if table:
        sections.append(("table", table))
    blob = b"".join(s for _, s in sections)
    assert len(blob) == nbytes, (w.name, layout, len(blob), nbytes)
    entry = {"name": w.name, "shape": list(k.shape), "depthwise": rep.depthwise, "kind": rep.kind,
             "bits": rep.bits, "layout": layout, "nnz": int(pos.size), "bytes": nbytes, "sections": []}
    off = 0
    for name, s in sections:
        entry["sections"].append({"name": name, "offset": off, "bytes": len(s)})
        off += len(s)
    return entry, blob


def write_packed(wrapped, out_dir, stem: str = "weights_packed") -> dict:
    """Write <stem>.bin (exactly the kernels' storage bytes) and <stem>.json (the manifest)."""
    from pocketflow.io import atomic_write_bytes, atomic_write_text
    entries, blobs, off = [], [], 0
    for w in wrappers(wrapped):
        entry, blob = encode_layer(w)
        entry["offset"] = off
        off += len(blob)
        entries.append(entry)
        blobs.append(blob)
    out = Path(out_dir)
    binp = atomic_write_bytes(out / f"{stem}.bin", b"".join(blobs))
    manifest = {"format": "pocketflow-packed-1", "payload_bytes": off, "layers": entries,
                "doc": "see pocketflow.learners.wrappers (packed export) for the layout"}
    js = atomic_write_text(out / f"{stem}.json", json.dumps(manifest, indent=1))
    return {"packed": {"path": str(binp), "bytes": off},
            "packed_manifest": {"path": str(js), "bytes": js.stat().st_size}}


def read_packed(bin_path, manifest_path) -> dict[str, np.ndarray]:
    """Decode a packed export back to float32 kernels (the inverse of `write_packed`)."""
    data = Path(bin_path).read_bytes()
    manifest = json.loads(Path(manifest_path).read_text())
    out = {}
    for e in manifest["layers"]:
        shape, n = tuple(e["shape"]), int(np.prod(e["shape"]))
        ch = num_channels(shape, e["depthwise"])
        sec = {s["name"]: data[e["offset"] + s["offset"]: e["offset"] + s["offset"] + s["bytes"]]
               for s in e["sections"]}
        nnz, kind, bits = e["nnz"], e["kind"], e["bits"]
        if e["layout"] == "dense":
            pos = np.arange(n)
        elif e["layout"] == "bitmap":
            pos = np.flatnonzero(np.unpackbits(np.frombuffer(sec["bitmap"], np.uint8), bitorder="little")[:n])
        else:
            row_ptr = np.frombuffer(sec["row_ptr"], "<i4")
            cols = np.frombuffer(sec["col_idx"], "<u2" if len(sec["col_idx"]) == 2 * nnz else "<u4")
            rows = np.repeat(np.arange(ch), np.diff(row_ptr))
            pos = cols.astype(np.int64) * ch + rows
        codes = unpack_bits(sec["codes"], 32 if kind == "float" else bits, nnz)
        if kind == "float":
            vals = codes.astype("<u4").view("<f4")
        elif kind == "grid":
            scales = np.frombuffer(sec["table"], "<f4")
            q = codes.astype(np.int64) - (2 ** (bits - 1) - 1)
            vals = q.astype(np.float32) * scales[pos % ch]
        else:
            vals = np.frombuffer(sec["table"], "<f4")[codes.astype(np.int64)]
        flat = np.zeros(n, np.float32)
        flat[pos] = vals
        out[e["name"]] = flat.reshape(shape)
    return out


# -- the learner base ---------------------------------------------------------------------------

def _check_names(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return "must be a list of layer names"
    return None


def per_layer_field(check: Callable, what: str) -> Field:
    """`per_layer: {layer: value}` overriding the uniform value; values checked like the uniform one."""
    def _check(d):
        for k, v in d.items():
            msg = check(v)
            if msg:
                return f"entry '{k}' {msg}"
        return None
    return Field(dict, {}, check=_check, help=f"layer name -> {what}, overriding the uniform value")


COMMON_PARAMS = {
    "skip": Field(list, [], check=_check_names, help="kernel layers left uncompressed"),
    "skip_first": Field(bool, False, help="leave the first kernel layer uncompressed"),
    "skip_last": Field(bool, False, help="leave the last kernel layer uncompressed"),
    "min_params": Field(int, 0, check=non_negative, help="leave kernels with fewer weights uncompressed"),
}


class TransformLearner(Learner):
    """A learner that compresses by kernel transforms in the forward pass.

    Subclasses declare the per-layer knob (`dim`: 'sparsity' or 'bits', one search dimension
    `<dim>/<layer>` per layer), the transforms it adds (`make_transforms`), training hooks and
    `describe` (the predicted storage). This base does the rest the same way for all of them:
    wrapping on top of whatever is already wrapped (so `chain` can stack steps), fine-tuning,
    stripping, exact size accounting, prediction for `project`, and the packed export.
    """
    metrics = ("compression",)
    dim: ClassVar[str] = "value"
    value_field: ClassVar[str] = "value"   # the uniform config key (e.g. 'sparsity', 'bits')
    #: where this learner's keys sit in the config, for messages (`chain` sets learner.<step>)
    config_key = "learner"

    # -- per-learner ------------------------------------------------------------------------
    def check_value(self, v) -> str | None:
        """An error message if `v` is not a valid per-layer value."""
        return None

    def dimension(self, name: str, layer):
        raise NotImplementedError

    def active(self, value) -> bool:
        """Whether a layer with this value gets transforms at all."""
        return True

    def prepare(self, model):
        """A graph rewrite applied once before wrapping (folding BatchNorm); returns a model."""
        return model

    def prepared_params(self, model) -> int:
        """Parameter count of `prepare(model)`, computed without building it."""
        from pocketflow.metrics import count_params
        return count_params(model)

    def make_transforms(self, name: str, layer, value, existing: list) -> list:
        raise NotImplementedError

    def output_bits(self, name: str, value) -> int | None:
        return None

    def train_hooks(self, wrapped, values: dict, data, budget) -> list:
        return []

    def before_training(self, wrapped, data) -> None:
        pass

    def finish(self, wrapped, values: dict, hooks: list) -> None:
        """After fine-tuning (e.g. final masks when the schedule did not get there)."""

    def describe(self, rep: KernelRep, value) -> KernelRep:
        """The predicted representation of a kernel after this learner (value = its setting)."""
        raise NotImplementedError

    # -- layers and params --------------------------------------------------------------------
    def candidates(self, model) -> list[str]:
        """Kernel layers this learner may touch, after the skip rules."""
        layers = list(kernel_layers(model))
        c = self.cfg
        skip = set(c.get("skip") or ())
        if c.get("skip_first") and layers:
            skip.add(layers[0][0])
        if c.get("skip_last") and layers:
            skip.add(layers[-1][0])
        return [n for n, layer, _ in layers if n not in skip and
                int(np.prod(kernel_variable(layer).shape)) >= (c.get("min_params") or 0)]

    def check(self, model) -> None:
        """One-line errors for layer names in the config that the model does not have."""
        check_cloneable(model)
        names = [n for n, _, _ in kernel_layers(model)]
        where = self.config_key
        for key in ("skip", "per_layer"):
            for n in self.cfg.get(key) or ():
                if n not in names:
                    kind = "" if n not in [layer.name for layer in _all_layers(model)] else " kernel"
                    raise PocketFlowError(
                        f"{where}.{key}: model '{model.name}' has no{kind} layer '{n}'{did_you_mean(n, names)}; "
                        f"its Conv2D/DepthwiseConv2D/Dense layers are: {', '.join(names) or 'none'}")
        cands = self.candidates(model)
        for n in self.cfg.get("per_layer") or ():
            if n not in cands:
                raise PocketFlowError(f"{where}.per_layer: layer '{n}' is excluded by the skip rules")
        if not cands:
            raise PocketFlowError(f"{where}: no layer left to compress in model '{model.name}' "
                                  "(check skip, skip_first, skip_last, min_params)")

    def uniform_value(self):
        return self.cfg.get(self.value_field)

    def default_params(self, model) -> dict:
        per = self.cfg.get("per_layer") or {}
        return {f"{self.dim}/{n}": per.get(n, self.uniform_value()) for n in self.candidates(model)}

    def search_space(self, model) -> dict:
        layers = {n: layer for n, layer, _ in kernel_layers(model)}
        return {f"{self.dim}/{n}": self.dimension(n, layers[n]) for n in self.candidates(model)}

    def layer_values(self, model, params: dict) -> dict:
        """{layer: value} from a search point; layers it does not mention take the config value."""
        cands = self.candidates(model)
        out = {k.split("/", 1)[1]: v for k, v in self.default_params(model).items()}
        prefix = f"{self.dim}/"
        for key, v in (params or {}).items():
            if not str(key).startswith(prefix):
                continue
            n = key[len(prefix):]
            if n not in cands:
                raise PocketFlowError(f"learner '{self.name}': parameter '{key}' names no compressible layer"
                                      f"{did_you_mean(n, cands)}")
            msg = self.check_value(v)
            if msg:
                raise PocketFlowError(f"learner '{self.name}': parameter '{key}' {msg}, got {v!r}")
            out[n] = v
        return out

    # -- prediction -----------------------------------------------------------------------------
    def predicted_reps(self, model, params, reps=None) -> dict:
        reps = dict(base_reps(model) if reps is None else reps)
        for n, v in self.layer_values(model, params).items():
            if self.active(v):
                reps[n] = self.describe(reps[n], v)
        return reps

    def predict_ratio(self, model, params, metric):
        return ratio_from_reps(model, self.predicted_reps(model, params), self.prepared_params(model),
                               metric, self.name)

    # -- compression ----------------------------------------------------------------------------
    def apply(self, model, params, data, budget, teacher=None, hooks=()):
        """Wrap `model` (plain or already wrapped; never modified) with this learner's transforms
        and fine-tune; returns (wrapped model, history). No `prepare`: the caller does it once."""
        values = self.layer_values(model, params)
        chosen = {n for n, v in values.items() if self.active(v)}
        wrapped = wrap_model(model, lambda n: n in chosen,
                             lambda n, layer, existing: self.make_transforms(n, layer, values[n], existing),
                             lambda n: self.output_bits(n, values[n]))
        self.before_training(wrapped, data)
        own = self.train_hooks(wrapped, values, data, budget)
        history = self.fine_tune(wrapped, data, budget, teacher=teacher, hooks=list(own) + list(hooks))
        self.finish(wrapped, values, own)
        return wrapped, history

    def compress(self, model, params, data, budget, hooks=()) -> Compressed:
        self.check(model)
        wrapped, history = self.apply(self.prepare(model), params, data, budget, teacher=model, hooks=hooks)
        return package(model, wrapped, history, {"params": dict(params or {})})

    def export_extra(self, compressed: Compressed, out_dir) -> dict:
        """The packed kernels (`write_packed`): a file exactly as large as the accounted kernels."""
        return write_packed(compressed.model, out_dir)

    # -- shared helper for subclasses -----------------------------------------------------------
    @staticmethod
    def total_steps(cfg: dict, data, budget) -> int:
        """Optimizer steps the trainer will run for `budget` (schedules are laid out on them)."""
        if not (budget.steps or budget.epochs):
            return 0
        try:
            from pocketflow.training import plan
        except ImportError:  # a trainer without `plan`: its single-process arithmetic
            per_epoch = max(1, math.ceil(len(data.x_train) / int(cfg["batch_size"])))
            return int(budget.steps) if budget.steps else int(math.ceil(budget.epochs * per_epoch))
        from pocketflow.distributed import world
        return plan(cfg, len(data.x_train), budget.epochs, budget.steps, world().size).total_steps


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if _is_model(layer):
            yield from _all_layers(layer)
