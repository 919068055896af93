"""A Keras model's layer graph, walked once, and the registry of layer kinds.

`walk` lists the call nodes of a Functional or built Sequential model in topological order,
with the tensors each reads and writes, the layers it reads from and the layers that read it.

The registry says how the channels of a layer's last axis flow through it, which is all the
channel-group analysis and the surgery of channel pruning need to know about a layer:

- `producer`    Conv/Dense: new output channels; input channels are kernel rows
- `separable`   SeparableConv: a producer whose input goes through a depthwise kernel first
- `channelwise` BatchNormalization, DepthwiseConv: one weight slice per channel, layout unchanged
- `pass`        activations, pooling, dropout, padding: layout unchanged, no weights sliced
- `merge`       Add, Multiply, ...: the inputs share one layout (their groups are united)
- `concat`      Concatenate on the channel axis: the layouts are joined
- `flatten`     Flatten (channels-last): the layout repeats once per spatial position
- `opaque`      anything else: the channels next to it are kept whole (pinned)

A class that is not registered is opaque, so an unknown layer can cost pruning room but never
correctness. `register_layer` lets a user declare their own layer (exact class: a subclass may
do something else with the channels), in the spirit of Torch-Pruning's customized pruners.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pocketflow.errors import PocketFlowError

INPUT = "input"              # a model input: channels are fixed
PRODUCER = "producer"
SEPARABLE = "separable"
CHANNELWISE = "channelwise"
PASS = "pass"
MERGE = "merge"
CONCAT = "concat"
FLATTEN = "flatten"
OPAQUE = "opaque"
KINDS = (PRODUCER, SEPARABLE, CHANNELWISE, PASS, MERGE, CONCAT, FLATTEN, OPAQUE)

MIXING_ACTIVATIONS = ("softmax", "log_softmax")


# -- the walk --------------------------------------------------------------------------------------

@dataclass
class Node:
    """One call of a layer: the tensors it reads and writes, and the layers it reads from."""
    layer: object
    inputs: list
    outputs: list
    inbound: list[str]


@dataclass
class Topology:
    nodes: list[Node]                      # topological order
    outputs: list                          # the model's output tensors
    calls: dict[str, int]                  # layer name -> times called
    consumers: dict[str, list[str]] = field(default_factory=dict)  # layer -> layers reading it


def _functional(model):
    import keras
    if not isinstance(model, keras.Sequential):
        return model
    fn = getattr(model, "_functional", None)
    if fn is None:
        raise PocketFlowError(f"Sequential model '{model.name}' is not built: give it an Input "
                              "or call it once before compressing")
    return fn


def walk(model) -> Topology:
    """The call nodes of a functional or built Sequential `model`, in topological order."""
    fn = _functional(model)
    by_depth = getattr(fn, "_nodes_by_depth", None)
    if by_depth is None:
        raise PocketFlowError(f"model '{model.name}' is a subclassed Keras model without a layer graph; "
                              "channel pruning needs a functional or Sequential model")
    nodes, calls, consumers = [], {}, {}
    for depth in sorted(by_depth, reverse=True):
        for n in by_depth[depth]:
            layer = n.operation
            inbound = [t._keras_history.operation.name for t in n.input_tensors]
            nodes.append(Node(layer, list(n.input_tensors), list(n.output_tensors), inbound))
            calls[layer.name] = calls.get(layer.name, 0) + 1
            consumers.setdefault(layer.name, [])
            for src in dict.fromkeys(inbound):
                consumers.setdefault(src, []).append(layer.name)
    return Topology(nodes, list(fn.outputs), calls, consumers)


# -- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSpec:
    """How channels flow through one layer class (see `register_layer`)."""
    kind: str | Callable
    weights: dict = field(default_factory=dict)
    width: str | None = None
    check: Callable | None = None
    config: Callable | None = None
    kernel: str | None = None         # the weight sparsity and quantization compress ...
    forward: Callable | None = None   # ... and the forward pass that uses it (see register_layer)

    def resolve(self, layer, in_shapes: list, out_shapes: list) -> tuple[str, str | None]:
        """(kind, None), or (OPAQUE, reason) when this call is one the spec does not cover."""
        kind, why = self.kind(layer, in_shapes, out_shapes) if callable(self.kind) else (self.kind, None)
        if why is None and self.check is not None:
            why = self.check(layer, in_shapes, out_shapes)
        if kind == OPAQUE:
            return OPAQUE, why or f"{type(layer).__name__} is registered as opaque"
        return (OPAQUE, why) if why else (kind, None)

    def rules(self, weight: str) -> dict:
        """{axis: side} of a weight: "in"/"out" follow the input/output channel mask, "in*" the
        input mask repeated (a depthwise multiplier)."""
        return self.weights.get(weight, self.weights.get("*", {}))

    def configure(self, cfg: dict, in_mask, out_mask) -> dict:
        """The config of the narrower copy of a layer."""
        if self.kind in (PRODUCER, SEPARABLE):
            key = self.width or ("units" if "units" in cfg else "filters")
            cfg[key] = int(out_mask.sum())
        return self.config(cfg, in_mask, out_mask) if self.config else cfg


_DEFAULT_WEIGHTS = {
    PRODUCER: {"kernel": {-2: "in", -1: "out"}, "bias": {-1: "out"}},
    SEPARABLE: {"depthwise_kernel": {-2: "in"}, "pointwise_kernel": {-2: "in*", -1: "out"}, "bias": {-1: "out"}},
    CHANNELWISE: {"*": {-1: "in"}},
}
_REGISTRY: dict[type, LayerSpec] = {}
_builtins_loaded = False


def register_layer(layer_class: type, kind: str, *, weights: dict | None = None, width: str | None = None,
                   check: Callable | None = None, config: Callable | None = None, kernel: str | None = None,
                   forward: Callable | None = None) -> type:
    """Declare how channels flow through `layer_class` (one of `KINDS`, see the module docstring).

    weights: weight name -> {axis: "in" | "out" | "in*"}, the axes sliced with the input or
        output channels ("*": every other weight). Defaults per kind: producer
        {"kernel": {-2: "in", -1: "out"}, "bias": {-1: "out"}}; channelwise {"*": {-1: "in"}}.
    width: for a producer, the config key of its output channel count ("filters"/"units").
    check: (layer, in_shapes, out_shapes) -> None, or a reason why this instance is not covered
        (it is then opaque: its channels are kept, the reason is reported).
    config: (config, in_mask, out_mask) -> the config of the narrower copy, for a layer whose
        config names a channel count.
    kernel, forward: make one weight compressible by weight sparsity and quantization, which
        transform a kernel inside a wrapper that recomputes the layer's output: `kernel` names
        the attribute holding it (output channels on its last axis), `forward(layer, inputs,
        kernel)` is the layer's output computed with `kernel` in its place. Without them the
        layer's weights are left as they are (a subclass of Conv2D/Dense that overrides `call`
        too: the wrapper would compute the base layer's op instead).
    Returns `layer_class`; registering a class again replaces its entry.
    See learners/examples/custom_layers.py for a worked example.
    """
    if not isinstance(layer_class, type):
        raise PocketFlowError(f"register_layer: {layer_class!r} is not a class")
    if kind not in KINDS:
        raise PocketFlowError(f"register_layer: kind '{kind}' is not one of {', '.join(KINDS)}")
    if (kernel is None) != (forward is None):
        raise PocketFlowError("register_layer: give both kernel= and forward= (or neither)")
    _builtins()  # so a user's entry for a built-in class wins over the default
    _REGISTRY[layer_class] = LayerSpec(kind, dict(_DEFAULT_WEIGHTS.get(kind, {}) if weights is None else weights),
                                       width, check, config, kernel, forward)
    return layer_class


def spec_of(layer) -> LayerSpec | None:
    _builtins()
    return _REGISTRY.get(type(layer))


def mixing_activation(layer) -> str | None:
    """The name of a layer's activation if it mixes channels (softmax), else None."""
    act = getattr(layer, "activation", None)
    name = getattr(act, "__name__", str(act)) if act is not None else ""
    return name if name in MIXING_ACTIVATIONS else None


def classify(layer, in_shapes: list, out_shapes: list) -> tuple[str, str | None]:
    """(kind, None) for a layer the analysis understands, else (OPAQUE, one-line reason)."""
    import keras
    name = type(layer).__name__
    if name == "InputLayer":
        return INPUT, None
    if isinstance(layer, keras.Model):
        return OPAQUE, f"nested model ({name}) is treated as one opaque layer"
    if name == "Lambda":
        return OPAQUE, "Lambda layer (arbitrary code)"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return OPAQUE, f"{name} with data_format={layer.data_format} (only channels_last is supported)"
    if getattr(layer, "quantization_mode", None):
        return OPAQUE, f"quantized {name} ({layer.quantization_mode})"
    spec = spec_of(layer)
    if spec is None:
        return OPAQUE, (f"{name} is not a layer channel pruning knows "
                        "(pocketflow.learners.register_layer can declare it)")
    return spec.resolve(layer, in_shapes, out_shapes)


# -- built-in layers --------------------------------------------------------------------------------

def _rank(shapes: list) -> int:
    return len(shapes[0]) if shapes else 0


def _ungrouped(layer, ins, outs):
    groups = getattr(layer, "groups", 1)
    return None if groups == 1 else f"grouped convolution (groups={groups})"


def _single_depth(layer, ins, outs):
    mult = getattr(layer, "depth_multiplier", 1)
    return None if mult == 1 else f"depth_multiplier={mult} (only 1 is supported)"


def _channel_axis(layer, ins, outs):
    ok = layer.axis in (-1, _rank(ins) - 1)
    return None if ok else f"BatchNormalization over axis {layer.axis} (not the channel axis)"


def _no_mixing(layer, ins, outs):
    act = mixing_activation(layer)
    return f"{act} mixes channels" if act else None


def _concat_kind(layer, ins, outs):
    return (CONCAT if layer.axis in (-1, _rank(ins) - 1) else MERGE), None


def _reshape_kind(layer, ins, outs):
    if ins and outs and ins[0][-1] is not None and outs[0][-1] == ins[0][-1]:
        return PASS, None  # only the other axes move: channel c stays at position c
    if outs and len(outs[0]) == 2:
        return FLATTEN, None
    return OPAQUE, "Reshape moves channels between axes"


def _reshape_config(cfg: dict, in_mask, out_mask) -> dict:
    """The target shape with the narrower last axis (a -1 there is left to Keras)."""
    shape = list(cfg["target_shape"])
    if out_mask is not None and shape and shape[-1] != -1:
        shape[-1] = int(out_mask.sum())
    return {**cfg, "target_shape": tuple(shape)}


def _builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import keras
    L = keras.layers
    add = _REGISTRY.__setitem__
    for cls in (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense):
        add(cls, LayerSpec(PRODUCER, _DEFAULT_WEIGHTS[PRODUCER], "units" if cls is L.Dense else "filters",
                           check=_ungrouped))
    for cls in (L.SeparableConv1D, L.SeparableConv2D):
        add(cls, LayerSpec(SEPARABLE, _DEFAULT_WEIGHTS[SEPARABLE], "filters"))
    add(L.BatchNormalization, LayerSpec(CHANNELWISE, {"*": {-1: "in"}}, check=_channel_axis))
    for cls in (L.DepthwiseConv1D, L.DepthwiseConv2D):
        add(cls, LayerSpec(CHANNELWISE, {"kernel": {-2: "in"}, "*": {-1: "in"}}, check=_single_depth))
    for cls in (L.ReLU, L.LeakyReLU, L.ELU, L.Activation, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
                L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization,
                L.Identity, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D,
                L.AveragePooling2D, L.AveragePooling3D, L.GlobalAveragePooling1D, L.GlobalAveragePooling2D,
                L.GlobalAveragePooling3D, L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
                L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
                L.UpSampling1D, L.UpSampling2D, L.UpSampling3D):
        add(cls, LayerSpec(PASS, check=_no_mixing))
    for cls in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
        add(cls, LayerSpec(MERGE))
    add(L.Concatenate, LayerSpec(_concat_kind))
    add(L.Flatten, LayerSpec(FLATTEN))
    add(L.Reshape, LayerSpec(_reshape_kind, config=_reshape_config))
