"""Model zoo (input shape and class count as parameters) and user-model loading.

Every builder takes `input_shape`, `num_classes` and its own keyword arguments and
returns an untrained functional Keras model with explicit layer names, so graph
analysis (channel pruning) and reports can refer to layers by name.
"""
from __future__ import annotations

import importlib
import re
import sys
import zipfile
from pathlib import Path
from typing import Callable

import keras
from keras import layers

from pocketflow.errors import PocketFlowError
from pocketflow.registry import Registry

MODELS: Registry[Callable[..., keras.Model]] = Registry("model")


@MODELS.register("seed_cnn")
def seed_cnn(input_shape=(28, 28, 1), num_classes=10, filters=12):
    """The CNN of the TensorFlow pruning/quantization tutorials."""
    h, w = input_shape[0], input_shape[1]
    inp = keras.Input(input_shape, name="input")
    x = layers.Reshape((h, w, -1), name="reshape")(inp)
    x = layers.Conv2D(filters, 3, activation="relu", name="conv")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="seed_cnn")


@MODELS.register("lenet5")
def lenet5(input_shape=(28, 28, 1), num_classes=10):
    inp = keras.Input(input_shape, name="input")
    x = layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="lenet5")


def _conv_bn(x, filters, name, kernel=3, strides=1, relu=True, wd=1e-4):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                      kernel_regularizer=keras.regularizers.l2(wd) if wd else None, name=name)(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x


@MODELS.register("vgg_small")
def vgg_small(input_shape=(32, 32, 3), num_classes=10, widths=(32, 32, 64, 64, 128, 128), dense=256):
    inp = keras.Input(input_shape, name="input")
    x = inp
    for i, w in enumerate(widths):
        x = _conv_bn(x, w, f"conv{i + 1}")
        if i % 2 == 1:
            x = layers.MaxPooling2D(2, name=f"pool{i // 2 + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense, activation="relu", name="fc1")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="vgg_small")


def resnet_cifar(depth: int, input_shape=(32, 32, 3), num_classes=10, widths=(16, 32, 64)):
    if (depth - 2) % 6:
        raise PocketFlowError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    inp = keras.Input(input_shape, name="input")
    x = _conv_bn(inp, widths[0], "stem")
    for s, w in enumerate(widths):
        for b in range(n):
            stride = 2 if s > 0 and b == 0 else 1
            name = f"s{s + 1}b{b + 1}"
            y = _conv_bn(x, w, f"{name}_conv1", strides=stride)
            y = _conv_bn(y, w, f"{name}_conv2", relu=False)
            if stride != 1 or x.shape[-1] != w:
                x = _conv_bn(x, w, f"{name}_proj", kernel=1, strides=stride, relu=False)
            x = layers.Add(name=f"{name}_add")([x, y])
            x = layers.ReLU(name=f"{name}_out")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name=f"resnet{depth}")


for _d in (20, 32, 56):
    MODELS.register(f"resnet{_d}")(lambda depth=_d, **kw: resnet_cifar(depth, **kw))


@MODELS.register("mobilenet_v1")
def mobilenet_v1(input_shape=(32, 32, 3), num_classes=10, alpha=1.0):
    def c(v):
        return max(8, int(v * alpha))
    inp = keras.Input(input_shape, name="input")
    x = _conv_bn(inp, c(32), "stem", wd=0)
    cfg = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
    for i, (f, s) in enumerate(cfg):
        x = layers.DepthwiseConv2D(3, strides=s, padding="same", use_bias=False, name=f"dw{i + 1}")(x)
        x = layers.BatchNormalization(name=f"dw{i + 1}_bn")(x)
        x = layers.ReLU(6.0, name=f"dw{i + 1}_relu")(x)
        x = layers.Conv2D(c(f), 1, use_bias=False, name=f"pw{i + 1}")(x)
        x = layers.BatchNormalization(name=f"pw{i + 1}_bn")(x)
        x = layers.ReLU(6.0, name=f"pw{i + 1}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="mobilenet_v1")


@MODELS.register("mobilenet_v2")
def mobilenet_v2(input_shape=(32, 32, 3), num_classes=10, alpha=1.0, dropout=0.2):
    def c(v):
        return max(8, int(round(v * alpha / 8)) * 8)
    inp = keras.Input(input_shape, name="input")
    x = layers.Conv2D(c(32), 3, padding="same", use_bias=False, name="stem")(inp)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    blk = 0
    for t, ch, n, s in [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            blk += 1
            name, stride, inp_c = f"b{blk}", s if i == 0 else 1, x.shape[-1]
            y = x
            if t != 1:
                y = layers.Conv2D(inp_c * t, 1, use_bias=False, name=f"{name}_expand")(y)
                y = layers.BatchNormalization(name=f"{name}_expand_bn")(y)
                y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
            y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(y)
            y = layers.BatchNormalization(name=f"{name}_dw_bn")(y)
            y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
            y = layers.Conv2D(c(ch), 1, use_bias=False, name=f"{name}_project")(y)
            y = layers.BatchNormalization(name=f"{name}_project_bn")(y)
            x = layers.Add(name=f"{name}_add")([x, y]) if stride == 1 and inp_c == c(ch) else y
    x = layers.Conv2D(1280 if alpha <= 1 else c(1280), 1, use_bias=False, name="head")(x)
    x = layers.BatchNormalization(name="head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    out = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="mobilenet_v2")


def build_model(name: str, input_shape, num_classes: int, args: dict | None = None) -> keras.Model:
    """A zoo model for the data's image shape; a shape it cannot be built for is one line."""
    from pocketflow.checks import channels_first
    builder, shape = MODELS.get(name), tuple(input_shape)
    if channels_first(shape) is not None:
        raise PocketFlowError(f"the images are {shape}, which looks channels-first (N, C, H, W); zoo models "
                              "take channels-last images: convert them with x.transpose(0, 2, 3, 1)")
    try:
        return builder(input_shape=shape, num_classes=num_classes, **(args or {}))
    except TypeError as e:
        raise PocketFlowError(f"model '{name}': bad model.args ({e})") from None
    except ValueError as e:  # e.g. images too small for its convolutions and pooling
        first = (str(e).splitlines() or [""])[0][:200]
        raise PocketFlowError(f"model '{name}' cannot be built for images of shape {shape} ({first}); "
                              "choose a zoo model that fits them or resize the images") from None


def _not_a_file(path: Path) -> PocketFlowError:
    """What a model path that is not a file is, and what to give instead."""
    if not path.is_dir():
        return PocketFlowError(f"model file not found: {path}")
    if (path / "saved_model.pb").is_file():
        return PocketFlowError(
            f"{path} is a TensorFlow SavedModel directory; PocketFlow needs a .keras file: load it with the "
            "Keras that saved it and save it as one (model = tf_keras.models.load_model(dir); "
            "model.save('model.keras'))")
    if (path / "best" / "model.keras").is_file():
        return PocketFlowError(f"{path} is a run directory, not a model file; give {path / 'best' / 'model.keras'}")
    inside = sorted(p.name for p in path.glob("*.keras"))[:3]
    hint = f" (it holds {', '.join(inside)})" if inside else ""
    return PocketFlowError(f"{path} is a directory, not a .keras model file{hint}")


def load_keras_file(path, unsafe: bool = False) -> keras.Model:
    """Load a user's `.keras` file; safe_mode refuses arbitrary code (Lambda layers)."""
    path = Path(path)
    if not path.is_file():
        raise _not_a_file(path)
    if path.suffix not in (".keras", ".h5"):
        raise PocketFlowError(f"{path}: expected a .keras file")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise PocketFlowError(f"{path}: corrupt or truncated .keras file (not a zip archive)")
    try:
        model = keras.saving.load_model(path, safe_mode=not unsafe, compile=False)
    except (ValueError, TypeError) as e:
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", str(e))
        if missing:  # a user's custom layer whose module was not imported: say how to fix it
            raise PocketFlowError(
                f"{path}: uses the custom class '{missing.group(1)}', which is not registered; list the module "
                "that defines it (with @keras.saving.register_keras_serializable) in model.imports") from None
        if isinstance(e, TypeError):
            raise PocketFlowError(f"{path}: corrupt or unreadable .keras file ({str(e).splitlines()[0][:200]})") from None
        msg = str(e)
        if "safe_mode" in msg or "Lambda" in msg or "unsafe" in msg.lower():
            raise PocketFlowError(
                f"{path}: refused to load a model with arbitrary Python code (e.g. a Lambda layer) in safe "
                "mode; pass --unsafe-load (model.unsafe_load: true) only if you trust this file") from None
        raise PocketFlowError(f"{path}: cannot load model ({msg.splitlines()[0][:200]})") from None
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise PocketFlowError(f"{path}: corrupt or unreadable .keras file ({type(e).__name__}: {first})") from None
    if not isinstance(model, keras.Model):
        raise PocketFlowError(f"{path}: does not contain a Keras model")
    return model


def _cwd_on_path() -> None:
    """User modules are found in the working directory, as `python -m` would find them."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def import_modules(modules) -> None:
    """Import the user's modules (from the working directory too) so their registered custom
    layers and model functions exist before a `.keras` file is loaded."""
    _cwd_on_path()
    for name in modules or ():
        try:
            importlib.import_module(name)
        except Exception as e:
            raise PocketFlowError(f"model.imports: cannot import '{name}' ({type(e).__name__}: {e})") from None


def load_from_function(spec: str, input_shape, num_classes: int, args: dict | None = None) -> keras.Model:
    """`package.module:function` -> the Keras model it returns."""
    mod_name, _, fn_name = spec.partition(":")
    _cwd_on_path()
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise PocketFlowError(f"model '{spec}': cannot import ({e})") from None
    kwargs = dict(args or {})
    import inspect
    try:
        sig = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        sig = {}
    takes_kw = any(p.kind is p.VAR_KEYWORD for p in sig.values())
    for key, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if key in sig or takes_kw:
            kwargs.setdefault(key, value)  # the data decides the shape and class count
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise PocketFlowError(f"model '{spec}' raised {type(e).__name__}: {e}") from None
    if not isinstance(model, keras.Model):
        raise PocketFlowError(f"model '{spec}' returned {type(model).__name__}, not a keras.Model")
    return model


def resolve_model(cfg: dict, input_shape, num_classes: int) -> tuple[keras.Model, bool]:
    """From the `model` config section: (model, is_pretrained). Whether the model fits the data
    is checked by pocketflow.checks.check_inputs, with both in hand."""
    name = cfg["name"]
    import_modules(cfg.get("imports"))
    if name.endswith((".keras", ".h5")) or "/" in name or (name not in MODELS and Path(name).is_dir()):
        model, pretrained = load_keras_file(name, cfg.get("unsafe_load", False)), True
    elif ":" in name:
        model, pretrained = load_from_function(name, input_shape, num_classes, cfg.get("args")), False
    else:
        model, pretrained = build_model(name, input_shape, num_classes, cfg.get("args")), False
    if cfg.get("pretrained") is not None:
        pretrained = bool(cfg["pretrained"])
    return model, pretrained
