"""Size, cost and accuracy measures shared by learners, search and reports.

MAC rules (multiply-accumulates, biases not counted):
- Conv2D: H_out·W_out·C_out·(k_h·k_w·C_in/groups); DepthwiseConv2D: H_out·W_out·C_in·mult·k_h·k_w;
  SeparableConv2D: its depthwise part + H_out·W_out·C_in·mult·C_out; Dense: in·units (per position).
- BatchNormalization: one MAC per output element (x·a + b; folded into the conv at export).
- Pooling: output elements · window size (global pooling: input elements).
- Element-wise layers (ReLU, Add, Flatten, Reshape, Dropout, …): 0.
"""
from __future__ import annotations

import gzip
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class LayerCost:
    name: str
    type: str
    output_shape: tuple
    params: int
    macs: int


def _shape(t) -> tuple:
    s = t.shape if hasattr(t, "shape") else t
    return tuple(s)


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs if x is not None))


def layer_macs(layer) -> int:
    import keras
    L = keras.layers
    try:
        out = _shape(layer.output)
        inp = _shape(layer.input) if not isinstance(layer.input, list) else _shape(layer.input[0])
    except (AttributeError, ValueError):
        return 0
    if isinstance(layer, L.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return _prod(out[1:3]) * int(inp[-1]) * layer.depth_multiplier * kh * kw
    if isinstance(layer, L.SeparableConv2D):
        kh, kw = layer.kernel_size
        cin, mult = int(inp[-1]), layer.depth_multiplier
        return _prod(out[1:3]) * cin * mult * (kh * kw + layer.filters)
    if isinstance(layer, L.Conv2D):
        kh, kw = layer.kernel_size
        groups = getattr(layer, "groups", 1) or 1
        return _prod(out[1:]) * kh * kw * int(inp[-1]) // groups
    if isinstance(layer, L.Dense):
        return _prod(out[1:]) * int(inp[-1])
    if isinstance(layer, L.BatchNormalization):
        return _prod(out[1:])
    if isinstance(layer, (L.MaxPooling2D, L.AveragePooling2D)):
        return _prod(out[1:]) * _prod(layer.pool_size)
    if isinstance(layer, (L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)):
        return _prod(inp[1:])
    return 0


def layer_costs(model) -> list[LayerCost]:
    rows = []
    for layer in _flat_layers(model):
        if layer.__class__.__name__ == "InputLayer":
            continue
        try:
            out = _shape(layer.output)
        except (AttributeError, ValueError):
            out = ()
        rows.append(LayerCost(layer.name, layer.__class__.__name__, out,
                              int(sum(_prod(w.shape) for w in layer.weights)), layer_macs(layer)))
    return rows


def _flat_layers(model):
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _flat_layers(layer)
        else:
            yield layer


def count_macs(model) -> int:
    return sum(r.macs for r in layer_costs(model))


def count_params(model, trainable_only: bool = False) -> int:
    ws = model.trainable_weights if trainable_only else model.weights
    return int(sum(_prod(w.shape) for w in ws))


def float_bytes(model) -> int:
    """Bytes of the weights stored as float32 (the uncompressed reference)."""
    return 4 * count_params(model)


def gzip_size(path_or_bytes) -> int:
    data = Path(path_or_bytes).read_bytes() if not isinstance(path_or_bytes, bytes) else path_or_bytes
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def file_size(path) -> int:
    return Path(path).stat().st_size


def format_table(rows: list[LayerCost]) -> str:
    head = f"{'layer':<28}{'type':<24}{'output shape':<22}{'params':>10}{'MACs':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.name[:27]:<28}{r.type[:23]:<24}{str(r.output_shape)[:21]:<22}{r.params:>10,}{r.macs:>14,}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<74}{sum(r.params for r in rows):>10,}{sum(r.macs for r in rows):>14,}")
    return "\n".join(lines)


# -- TFLite ------------------------------------------------------------------------------------

def tflite_interpreter(model_bytes_or_path, threads: int = 1, delegates: bool = True):
    """delegates=False: the built-in kernels without XNNPACK (to tell a delegate's limit from a bad file)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from pocketflow.io import quiet_stderr
    kw = {"num_threads": threads, "experimental_op_resolver_type":
          OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    with quiet_stderr():  # native start-up messages
        if isinstance(model_bytes_or_path, (bytes, bytearray)):
            return Interpreter(model_content=bytes(model_bytes_or_path), **kw)
        return Interpreter(model_path=str(model_bytes_or_path), **kw)


class TFLiteRunner:
    """Runs a TFLite model on float inputs, quantizing/dequantizing int8 I/O when needed."""

    def __init__(self, model, threads: int = 1, batch: int = 1, delegates: bool = True):
        self.interp = tflite_interpreter(model, threads, delegates)
        self.inp = self.interp.get_input_details()[0]
        self.out = self.interp.get_output_details()[0]
        self.batch = None
        self._resize(batch)

    def _resize(self, batch):
        if batch != self.batch:
            shape = list(self.inp["shape"])
            shape[0] = batch
            self.interp.resize_tensor_input(self.inp["index"], shape)
            from pocketflow.io import quiet_stderr
            with quiet_stderr():  # "Created TensorFlow Lite XNNPACK delegate": applied here
                self.interp.allocate_tensors()
            self.inp = self.interp.get_input_details()[0]
            self.out = self.interp.get_output_details()[0]
            self.batch = batch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._resize(len(x))
        d = self.inp
        if d["dtype"] != np.float32:
            scale, zero = d["quantization"]
            x = np.clip(np.round(x / scale + zero), np.iinfo(d["dtype"]).min, np.iinfo(d["dtype"]).max)
        self.interp.set_tensor(d["index"], x.astype(d["dtype"]))
        self.interp.invoke()
        y = self.interp.get_tensor(self.out["index"])
        if self.out["dtype"] != np.float32:
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    def predict(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        return np.concatenate([self(x[i:i + batch]) for i in range(0, len(x), batch)])


def tflite_accuracy(model, x, y, batch: int = 256) -> float:
    pred = TFLiteRunner(model, threads=2).predict(x, batch)
    return float(np.mean(np.argmax(pred, -1) == y))


def invoke_ms(runner, x: np.ndarray, runs: int, warmup: int = 0) -> np.ndarray:
    """Wall time of each of `runs` invokes of `runner` on `x` (after `warmup` untimed ones), in ms."""
    for _ in range(warmup):
        runner(x)
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        runner(x)
        times[i] = (time.perf_counter() - t0) * 1e3
    return times


def tflite_latency(model, input_shape, batch: int = 1, threads: int = 1, runs: int = 50,
                   warmup: int = 10) -> float:
    """Median wall time of one invoke, in milliseconds."""
    r = TFLiteRunner(model, threads=threads, batch=batch)
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    return float(np.median(invoke_ms(r, x, runs, warmup)))


# -- Keras ---------------------------------------------------------------------------------------

def predict(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Forward pass in inference mode through a compiled tf.function (model.predict is slow)."""
    import tensorflow as tf
    fn = _predict_fn(model)
    out = [fn(tf.constant(x[i:i + batch], tf.float32)).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, *model.output_shape[1:]), np.float32)


_PREDICT_CACHE: dict = {}


def _predict_fn(model):
    """One trace per model: a None batch dimension covers the short last batch. A search makes a
    new model per trial, so TensorFlow's "frequent retracing" warning (keyed by the lambda's code,
    shared by all of them) would fire on every run; these traces are by design, so it is off."""
    import tensorflow as tf
    key = id(model)
    hit = _PREDICT_CACHE.get(key)
    if hit is None or hit[0] is not model:
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        fn._omit_frequent_tracing_warning = True  # private, stable since TF 2.4; harmless if gone
        hit = (model, fn)
        _PREDICT_CACHE.clear()
        _PREDICT_CACHE[key] = hit
    return hit[1]


def accuracy(model, x, y, batch: int = 256) -> float:
    return float(np.mean(np.argmax(predict(model, x, batch), -1) == y))
