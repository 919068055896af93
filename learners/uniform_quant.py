"""`uniform_quant`: quantization-aware training with b-bit symmetric per-channel weights.

Why QAT and why fold first: TFLite runs conv + BatchNorm as one conv with a folded kernel
and bias, so fake-quantizing the unfolded kernel would train a different function from the
one deployed. `fold_batchnorm` rewrites the graph first (the conv gets a bias, the BN layer
goes away; a ReLU/ReLU6 that follows alone is fused into the conv's activation so activation
ranges are observed where TFLite quantizes them). Then every kernel gets a `FakeQuant`
(scale = max|w| / (2^(b-1) - 1) per output channel, the narrow symmetric range TFLite uses for
int8, straight-through gradient) and every wrapped layer's output an 8-bit `ActivationQuant`
with EMA min/max. At 8 bits the converter's own int8 quantization reproduces the trained weights
exactly, so the int8 TFLite model tracks the QAT model. `weight_scales: auto` uses one scale per
tensor instead on top of a codebook (the layer keeps its <= 2^bits values, which gzip well, and
the int8 export, seeing a per-tensor grid, converts that layer per tensor: see pocketflow.export).

Below 8 bits TFLite cannot hold the codes; the export adds the packed file (`accounting.export_packed`,
codes bit-packed + a float32 scale per output channel: exactly ceil(b * n / 8) + 4 * channels
bytes per kernel) next to a TFLite model holding the dequantized grid values.
"""
from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np

from pocketflow.schema import Field
from pocketflow.learners.base import register
from pocketflow.learners.kernels import (custom_kernel, is_depthwise, is_kernel_layer, kernel_variable,
                                        num_channels)
from pocketflow.learners.transform_learner import COMMON_PARAMS, TransformLearner, per_layer_field
from pocketflow.learners.transforms import Codebook, FakeQuant
from pocketflow.learners.wrap import (activation_quants, calibrate_activations, check_cloneable, clone_graph,
                                      clone_layer, sole_consumers)


def _bits_2_8(v):
    if not isinstance(v, int) or isinstance(v, bool):
        return "must be an integer"
    return None if 2 <= v <= 8 else "must be between 2 and 8"


def _decay(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


# -- BatchNorm folding --------------------------------------------------------------------------

def _fusable_activation(layer) -> str | None:
    """'relu' / 'relu6' if `layer` is a standalone activation a kernel layer can absorb."""
    L = keras.layers
    if isinstance(layer, L.ReLU):
        c = layer.get_config()
        if c.get("negative_slope", 0) == 0 and c.get("threshold", 0) == 0:
            mv = c.get("max_value")
            return "relu" if mv is None else ("relu6" if float(mv) == 6.0 else None)
    if isinstance(layer, L.Activation):
        a = layer.get_config().get("activation")
        return a if a in ("relu", "relu6") else None
    return None


def _is_linear(layer) -> bool:
    return layer.activation in (None, keras.activations.linear)


def _bn_foldable(layer) -> bool:
    """A BatchNormalization over the last (channel) axis."""
    if not isinstance(layer, keras.layers.BatchNormalization):
        return False
    axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) and len(layer.axis) == 1 else layer.axis
    return isinstance(axis, int) and axis in (-1, len(layer.input.shape) - 1)


def fold_plan(model, fuse_activations: bool = True) -> list[tuple]:
    """(kernel layer, BatchNorm or None, fused activation layer or None, activation name) for
    every top-level kernel layer whose output feeds only a BatchNorm (and/or a lone ReLU)."""
    nxt = sole_consumers(model)
    plan = []
    for layer in model.layers:
        if not (is_kernel_layer(layer) and custom_kernel(layer) is None and _is_linear(layer)):
            continue  # (a user's layer: what its output does with a bias is its own)
        after, bn, act = nxt.get(layer.name), None, None
        if after is not None and _bn_foldable(after):
            bn, after = after, nxt.get(after.name)
        if fuse_activations and after is not None and _fusable_activation(after):
            act = after
        if bn is not None or act is not None:
            plan.append((layer, bn, act, _fusable_activation(act) if act else None))
    return plan


def _folded_weights(layer, bn):
    k = kernel_variable(layer).numpy()
    has_bias = getattr(layer, "bias", None) is not None
    b = layer.bias.numpy() if has_bias else np.zeros(num_channels(k.shape, is_depthwise(layer)), np.float32)
    if bn is None:
        return k, b
    var, mean = bn.moving_variance.numpy(), bn.moving_mean.numpy()
    gamma = bn.gamma.numpy() if bn.gamma is not None else np.ones_like(var)
    beta = bn.beta.numpy() if bn.beta is not None else np.zeros_like(var)
    f = gamma / np.sqrt(var + bn.epsilon)
    fk = f.reshape(k.shape[-2], k.shape[-1]) if is_depthwise(layer) else f
    return (k * fk).astype(np.float32), (beta + (b - mean) * f).astype(np.float32)


def fold_batchnorm(model, fuse_activations: bool = True):
    """A new model with every foldable BatchNorm folded into the kernel layer before it.

    kernel' = kernel * gamma / sqrt(var + eps) per output channel,
    bias'   = beta + (bias - mean) * gamma / sqrt(var + eps).
    The BN layer (and a fused ReLU/ReLU6) disappears from the graph; layer names are kept.
    BNs that follow anything else, or a layer with a non-linear activation, stay as they are.
    """
    check_cloneable(model)
    plan = fold_plan(model, fuse_activations)
    by_kernel = {p[0].name: p for p in plan}
    dropped = {x.name for _, bn, act, _ in plan for x in (bn, act) if x is not None}

    def clone_fn(layer):
        p = by_kernel.get(layer.name)
        if p is None:
            return clone_layer(layer)
        cfg = {**layer.get_config(), "use_bias": True}
        if p[3]:
            cfg["activation"] = p[3]
        return layer.__class__.from_config(cfg)

    if isinstance(model, keras.Sequential):
        new_layers = [clone_fn(layer) for layer in model.layers if layer.name not in dropped]
        t = model.inputs[0]
        out = keras.Sequential([keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name)]
                               + new_layers, name=model.name)
    else:
        def call_fn(layer, *args, **kwargs):
            return args[0] if layer.name in dropped else layer(*args, **kwargs)
        out = clone_graph(model, clone_fn, call_fn)
    for layer in out.layers:
        try:
            src = model.get_layer(layer.name)
        except ValueError:
            continue
        p = by_kernel.get(layer.name)
        if p is None:
            layer.set_weights(src.get_weights())
        else:
            k, b = _folded_weights(src, p[1])
            kvar = kernel_variable(layer)
            layer.set_weights([k if w is kvar else b for w in layer.weights])
    return out


# -- the learner --------------------------------------------------------------------------------

@register("uniform_quant")
class UniformQuant(TransformLearner):
    """QAT: per-channel symmetric b-bit weights, 8-bit activations, BatchNorm folded first."""
    dim = "bits"
    value_field = "bits"
    export_quantize = "int8"
    #: int8 kernels change the shipped file's speed (on some CPUs up, on others down: measured)
    metrics = TransformLearner.metrics + ("latency",)
    params = {
        "bits": Field(int, 8, check=_bits_2_8, help="weight bits, 2..8"),
        "per_layer": per_layer_field(_bits_2_8, "bits"),
        "activation_bits": Field(int, 8, choices=(8, 32), help="8: fake-quantize layer outputs; 32: float"),
        "fold_batchnorm": Field(bool, True, help="fold BatchNorm into the preceding kernel before QAT"),
        "ema_decay": Field(float, 0.99, check=_decay, help="activation range EMA decay"),
        "weight_scales": Field(str, "auto", choices=("auto", "per_channel", "per_tensor"),
                               help="weight scale per output channel or per tensor (auto: per tensor on "
                                    "a codebook, which keeps its <= 2^bits values, else per channel)"),
        **COMMON_PARAMS,
    }

    def check_value(self, v):
        return _bits_2_8(v)

    def dimension(self, name, layer):
        from pocketflow.hpo.space import Int
        return Int(2, 8)

    def scale(self, params, alpha):
        """bits = 2 + round(alpha * (b - 2)): alpha = 0 puts every layer at 2 bits."""
        alpha = min(1.0, max(0.0, alpha))
        return {k: (2 + int(round(alpha * (v - 2))) if k.startswith("bits/") else v) for k, v in params.items()}

    def relax(self, params, beta):
        """bits = b + round(beta * (8 - b)): beta = 1 puts every layer at 8 bits."""
        beta = min(1.0, max(0.0, beta))
        return {k: (int(v) + int(round(beta * (8 - int(v)))) if k.startswith("bits/") else v) for k, v in params.items()}

    def prepare(self, model):
        return fold_batchnorm(model) if self.cfg.get("fold_batchnorm", True) else model

    def prepared_params(self, model) -> int:
        from pocketflow.metrics import count_params
        n = count_params(model)
        if not self.cfg.get("fold_batchnorm", True):
            return n
        for layer, bn, _, _ in fold_plan(model):
            if bn is not None:
                n -= sum(int(np.prod(w.shape)) for w in bn.weights)
                if getattr(layer, "bias", None) is None:
                    n += int(bn.moving_mean.shape[0])
        return n

    def make_transforms(self, name, layer, value, existing):
        # on top of a codebook, one scale per tensor keeps the layer at <= 2^bits distinct values;
        # the int8 export reads the layout back from the weights (pocketflow.export.choose_weight_scales)
        scales = self.cfg.get("weight_scales", "auto")
        per_channel = (not any(isinstance(t, Codebook) for t in existing) if scales == "auto"
                       else scales == "per_channel")
        return [FakeQuant(value, per_channel, depthwise=is_depthwise(layer), name=f"{name}_quant")]

    def output_bits(self, name, value):
        return None if self.cfg.get("activation_bits", 8) == 32 else int(self.cfg.get("activation_bits", 8))

    def before_training(self, wrapped, data):
        for q in activation_quants(wrapped):
            q.decay = float(self.cfg.get("ema_decay", 0.99))
        calibrate_activations(wrapped, data.representative(256, seed=self.seed))

    def describe(self, rep, value):
        return rep if rep.kind == "codebook" else replace(rep, kind="grid", bits=int(value))
