"""Kernel wrappers: the one mechanism behind weight sparsity, quantization and clustering.

Why one mechanism: the three methods differ only in what they do to a layer's kernel in the
forward pass (mask it, snap it to a grid, tie it to a codebook: `learners.transforms`). A
`KernelWrapper` holds the original Conv2D / DepthwiseConv2D / Dense and a *chain* of
`KernelTransform`s; its forward pass recomputes the layer's op with the transformed kernel
(then bias and activation, then an optional activation fake quant, which `PooledQuant` moves
past a following max pooling), so gradients reach the real kernel and any transform state
(centroids), and stacking transforms composes methods without undoing earlier ones:

    mask -> codebook -> fake quant   zeros stay zero (the codebook keeps exact zeros on a fixed
                                     zero code, symmetric quantization maps 0 to 0), and a fake
                                     quant that follows a codebook quantizes per tensor, so the
                                     layer keeps at most 2^bits distinct values.

`wrap_model` clones a Functional or Sequential model with `keras.models.clone_model` (residual
graphs keep their structure) and never touches the input; wrapping an already wrapped model
appends transforms to the existing chains. `strip_model` bakes the transformed kernels into
plain layers: a normal Keras model that saves, loads and converts to TFLite.
"""
from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
from keras import ops

from pocketflow.errors import PocketFlowError
from pocketflow.learners.kernels import custom_kernel, is_depthwise, is_kernel_layer, kernel_variable
from pocketflow.learners.transforms.activation import ActivationQuant, PooledQuant, defers_quant
from pocketflow.learners.transforms.base import PKG


# -- walking models -------------------------------------------------------------------------------

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

    from pocketflow.learners.topology import walk
    if not isinstance(model, (Functional, keras.Sequential)) or not model.built:
        return {}
    topo = walk(model)
    nodes = [n for n in topo.nodes if not isinstance(n.layer, keras.layers.InputLayer)]
    uses = {}
    for n in nodes:
        for t in n.inputs:
            uses.setdefault(id(t), []).append(n)
    outputs = {id(t) for t in topo.outputs}
    out = {}
    for n in nodes:
        if topo.calls[n.layer.name] != 1 or len(n.outputs) != 1 or id(n.outputs[0]) in outputs:
            continue
        readers = uses.get(id(n.outputs[0]), [])
        if len(readers) == 1 and topo.calls[readers[0].layer.name] == 1:
            out[n.layer.name] = readers[0].layer
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


def all_layers(model):
    """Every layer of `model`, nested models and their layers included (wrappers not opened)."""
    for layer in model.layers:
        yield layer
        if _is_model(layer):
            yield from all_layers(layer)


# -- the wrapper layer ----------------------------------------------------------------------------

@keras.saving.register_keras_serializable(PKG)
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
        return getattr(self.layer, "activation", None)

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
        custom = custom_kernel(L)
        if custom is not None:  # a user's layer: its registered forward pass, with this kernel
            y = custom[1](L, inputs, k)
            return y if self.act_quant is None else self.act_quant(y, training=training)
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


# -- wrapping, stripping --------------------------------------------------------------------------

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


def _is_relu(layer) -> bool:
    return getattr(layer, "activation", None) in (keras.activations.relu, keras.activations.relu6)


def _pooled_quants(model, select, output_bits) -> dict[str, tuple]:
    """Pool name -> (kernel layer name, bits) for every selected ReLU kernel layer whose only
    consumer is a max pooling that `defers_quant`: its activation quant goes after the pool
    (`PooledQuant`: same values, fewer elements). bits None: the pool quantizes already."""
    pooled: dict[str, tuple] = {}
    for name, nxt in sole_consumers(model).items():
        layer = model.get_layer(name)
        inner = layer.layer if isinstance(layer, KernelWrapper) else layer
        if isinstance(nxt, PooledQuant):
            pooled[nxt.name] = (name, None)  # already quantized there
        elif (is_kernel_layer(inner) and defers_quant(nxt) and output_bits is not None and select(name)
              and getattr(layer, "act_quant", None) is None and output_bits(name) and _is_relu(inner)):
            pooled[nxt.name] = (name, output_bits(name))
    return pooled


def _copy_weights(model, out) -> None:
    """`model`'s weights into its wrapped clone `out` (wrapper state included)."""
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
    fresh: dict[int, int] = {}  # id(new wrapper) -> index of its first new transform
    pooled = _pooled_quants(model, select, output_bits)
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
            act = ActivationQuant(bits, nonnegative=_is_relu(inner), name=f"{layer.name}_act_quant")
        if not (existing or new or act):
            return clone_layer(layer)
        w = KernelWrapper(clone_layer(inner), [clone_layer(t) for t in existing] + new, act, name=layer.name)
        fresh[id(w)] = len(existing)
        return w

    out = clone_graph(model, clone_fn)
    _copy_weights(model, out)
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


def activation_quants(model) -> list:
    """Every activation fake quant in `model`: in kernel wrappers and in pooled quants."""
    out = [w.act_quant for w in wrappers(model) if w.act_quant is not None]
    return out + [layer.act_quant for layer in all_layers(model) if isinstance(layer, PooledQuant)]
