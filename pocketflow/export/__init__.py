"""Export: `.keras`, SavedModel, TFLite (`tflite`) and the packed compressed weights (`packed`).

`export_model` writes the formats a run asks for; the TFLite conversion and the int8
weight-scale choice live in `tflite`, re-exported here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pocketflow.export.sparse import SPARSE_ENCODINGS, sparse_tensors
from pocketflow.export.tflite import WEIGHT_SCALES, choose_weight_scales, on_tensor_grid, to_tflite, verify_tflite
from pocketflow.io import atomic_save_model, atomic_write_bytes, quiet_stderr

__all__ = ["export_model", "to_tflite", "verify_tflite", "choose_weight_scales", "on_tensor_grid", "WEIGHT_SCALES",
           "SPARSE_ENCODINGS", "sparse_tensors"]


def export_model(model, out_dir, formats=("keras", "tflite"), quantize: str | None = None,
                 data=None, verify: bool = True, stem: str = "model", weight_scales: str = "auto",
                 sparse_encoding: str = "off") -> dict:
    """Write the requested formats into `out_dir`; returns paths, sizes and checks
    (`weight_scales`, `sparse_encoding`: see `to_tflite`; the int8 entry records the layout used,
    every TFLite entry whether its file is sparse-encoded unless the option is off)."""
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
            blob = to_tflite(model, q, rep, weight_scales=weight_scales, sparse_encoding=sparse_encoding)
            p = atomic_write_bytes(out / f"{stem}{suffix}.tflite", blob)
            entry = {"path": str(p), "bytes": len(blob), "gzip_bytes": gzip_size(blob), "quantize": q}
            if sparse_encoding != "off":
                entry["sparse_encoding"] = {"mode": sparse_encoding, "encoded": bool(sparse_tensors(blob))}
            if q == "int8":
                entry["weight_scales"] = (choose_weight_scales(model) if weight_scales == "auto"
                                          else weight_scales)
            if verify and data is not None:
                sample = data.x_test[:64]
                if q is None:
                    entry["max_abs_diff_vs_keras"] = verify_tflite(model, blob, sample)
                entry["test_accuracy"] = tflite_accuracy(blob, data.x_test, data.y_test)
            result["files"][f"tflite{suffix}"] = entry
    return result
