"""Export: `.keras`, SavedModel, TFLite (float, dynamic-range, float16, full-integer int8).

Every TFLite export can be verified by running it with ai_edge_litert and comparing
with the Keras model on the same inputs.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.io import atomic_save_model, atomic_write_bytes, quiet_stderr


def to_tflite(model, quantize: str | None = None, representative: np.ndarray | None = None,
              sparsity: bool = False) -> bytes:
    """Convert a Keras 3 model to TFLite flatbuffer bytes."""
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


def export_model(model, out_dir, formats=("keras", "tflite"), quantize: str | None = None,
                 data=None, verify: bool = True, stem: str = "model") -> dict:
    """Write the requested formats into `out_dir`; returns paths, sizes and checks."""
    from pocketflow.metrics import file_size, gzip_size, tflite_accuracy
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"files": {}}
    if "keras" in formats:
        p = atomic_save_model(model, out / f"{stem}.keras")
        result["files"]["keras"] = {"path": str(p), "bytes": file_size(p), "gzip_bytes": gzip_size(p)}
    if "saved_model" in formats:
        target = out / f"{stem}_saved_model"
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".saved_model."))
        with quiet_stderr((1, 2)):
            model.export(str(tmp / "m"), verbose=False)
        from pocketflow.io import atomic_replace_dir
        atomic_replace_dir(tmp / "m", target)
        tmp.rmdir()
        result["files"]["saved_model"] = {"path": str(target)}
    if "tflite" in formats:
        rep = data.representative() if data is not None else None
        variants = {"": None} if quantize is None else {"": None, f"_{quantize}": quantize}
        for suffix, q in variants.items():
            blob = to_tflite(model, q, rep)
            p = atomic_write_bytes(out / f"{stem}{suffix}.tflite", blob)
            entry = {"path": str(p), "bytes": len(blob), "gzip_bytes": gzip_size(blob), "quantize": q}
            if verify and data is not None:
                sample = data.x_test[:64]
                if q is None:
                    entry["max_abs_diff_vs_keras"] = verify_tflite(model, blob, sample)
                entry["test_accuracy"] = tflite_accuracy(blob, data.x_test, data.y_test)
            result["files"][f"tflite{suffix}"] = entry
    return result
