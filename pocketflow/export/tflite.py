"""TFLite conversion (float, dynamic-range, float16, full-integer int8) and its check.

Every TFLite export can be verified by running it with ai_edge_litert and comparing
with the Keras model on the same inputs.

int8 weight scales: the converter quantizes every kernel per output channel by default. A model
trained with ONE scale per tensor (`uniform_quant` on top of a codebook: <= 2^bits distinct values
on a per-tensor int8 grid) would be re-quantized channel by channel, spreading its few values over
many int8 codes (higher entropy, worse gzip) and no longer holding the trained values. With
`weight_scales="auto"` the choice is read from the weights: layers whose kernel lies exactly on a
per-tensor grid (8 bits or fewer) are converted per tensor, when the converter can express it (all kernel
layers, or all Dense layers); otherwise per channel, as before.
"""
from __future__ import annotations

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.io import quiet_stderr

WEIGHT_SCALES = ("auto", "per_channel", "per_tensor", "per_tensor_dense")


def on_tensor_grid(kernel: np.ndarray, bits: int = 8, tol: float = 1e-3) -> bool:
    """Whether every weight is an integer multiple of ONE symmetric scale max|w| / (2^(b-1) - 1) for
    some b <= `bits` (what `FakeQuant(per_channel=False)` trains). Then per-tensor int8 keeps its
    <= 2^b - 1 values apart on as many codes (exactly the trained values when b = 8)."""
    k = np.asarray(kernel, np.float64)
    m = float(np.max(np.abs(k))) if k.size else 0.0
    if m == 0:
        return True
    for b in range(bits, 1, -1):
        q = k / (m / (2 ** (b - 1) - 1))
        if np.max(np.abs(q - np.round(q))) <= tol:
            return True
    return False


def _kernel_layers(model):
    import keras
    L = keras.layers
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _kernel_layers(layer)
        elif isinstance(layer, (L.Conv1D, L.Conv2D, L.Conv3D, L.DepthwiseConv2D, L.Dense)) and layer.weights:
            yield layer


def choose_weight_scales(model) -> str:
    """The int8 weight-scale layout that keeps the trained weights: 'per_tensor' when every kernel
    lies on a per-tensor grid of <= 8 bits, 'per_tensor_dense' when every Dense kernel does (the others
    keep their per-channel scales), else 'per_channel' (the converter's default)."""
    import keras
    grid = [(isinstance(layer, keras.layers.Dense), on_tensor_grid(layer.weights[0].numpy()))
            for layer in _kernel_layers(model)]
    if grid and all(ok for _, ok in grid):
        return "per_tensor"
    dense = [ok for is_dense, ok in grid if is_dense]
    return "per_tensor_dense" if dense and all(dense) else "per_channel"


def to_tflite(model, quantize: str | None = None, representative: np.ndarray | None = None,
              sparsity: bool = False, weight_scales: str = "auto", sparse_encoding: str = "off") -> bytes:
    """Convert a Keras 3 model to TFLite flatbuffer bytes.

    weight_scales (int8 only): 'per_channel' (one scale per output channel), 'per_tensor' (one per
    kernel), 'per_tensor_dense' (per tensor for Dense, per channel for convolutions) or 'auto'
    (`choose_weight_scales`: what the trained weights were quantized with).
    sparse_encoding: 'off' | 'on' | 'auto', see `export.sparse.pick` (checked on `representative`
    or uniform [0, 1] inputs); `sparsity=True` is the converter's encoding unchecked."""
    from pocketflow.export.sparse import SPARSE_ENCODINGS, pick
    if weight_scales not in WEIGHT_SCALES:
        raise PocketFlowError(f"unknown weight_scales '{weight_scales}': choose {', '.join(WEIGHT_SCALES)}")
    if sparse_encoding not in SPARSE_ENCODINGS:
        raise PocketFlowError(f"unknown sparse_encoding '{sparse_encoding}': choose {', '.join(SPARSE_ENCODINGS)}")
    blob = _convert(model, quantize, representative, sparsity, weight_scales)
    if sparse_encoding == "off" or sparsity:
        return blob
    encoded = _convert(model, quantize, representative, True, weight_scales)
    x = (np.asarray(representative[:16], np.float32) if representative is not None else
         np.random.default_rng(0).random((8, *model.input_shape[1:]), dtype=np.float32))
    return pick(blob, encoded, sparse_encoding, x)


def _convert(model, quantize, representative, sparsity: bool, weight_scales: str) -> bytes:
    import tensorflow as tf
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    opts = []
    if quantize in ("dynamic", "int8", "float16"):
        opts.append(tf.lite.Optimize.DEFAULT)
    if sparsity:
        opts.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    conv.optimizations = opts
    if quantize == "float16":
        conv.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if representative is None:
            raise PocketFlowError("int8 export needs representative data (training images)")
        rep = np.asarray(representative, np.float32)

        def gen():
            for i in range(len(rep)):
                yield [rep[i:i + 1]]
        conv.representative_dataset = gen
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
        scales = choose_weight_scales(model) if weight_scales == "auto" else weight_scales
        # the converter's documented-as-experimental switches for the two per-tensor layouts
        conv._experimental_disable_per_channel = scales == "per_tensor"
        conv._experimental_disable_per_channel_quantization_for_dense_layers = scales == "per_tensor_dense"
    elif quantize not in (None, "dynamic", "float16"):
        raise PocketFlowError(f"unknown quantization '{quantize}': choose int8, dynamic or float16")
    try:
        with quiet_stderr((1, 2)):
            return conv.convert()
    except Exception as e:
        raise PocketFlowError(f"TFLite conversion failed: {str(e).splitlines()[0][:300]}") from None


def verify_tflite(model, tflite: bytes, x: np.ndarray) -> float:
    """Max abs difference between Keras and TFLite outputs on `x`."""
    from pocketflow.metrics import TFLiteRunner, predict
    return float(np.max(np.abs(TFLiteRunner(tflite).predict(x) - predict(model, x))))
