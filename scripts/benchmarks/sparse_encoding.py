"""sparse-encoding: TFLite's sparse tensor encoding (`Optimize.EXPERIMENTAL_SPARSITY`) on the seed CNN
with magnitude sparsity (unstructured, 2:4, 1x4 / 1x16 blocks), float and full-int8: raw and gzip'd
bytes, whether ai_edge_litert runs it, outputs vs Keras and vs the dense file, latency, what the file holds.

    python scripts/benchmarks/sparse_encoding.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, md_table, write_page  # noqa: E402


def pruned(base, s: float, pattern: str):
    """A copy of `base` with the smallest-|w| share `s` of every Conv2D/Dense kernel set to zero."""
    import keras

    from pocketflow.learners.transforms.mask import magnitude_mask
    m = keras.models.clone_model(base)
    m.set_weights(base.get_weights())
    for layer in m.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            k = layer.kernel.numpy()
            layer.kernel.assign(k * magnitude_mask(k, s, pattern, False))
    return m


def holds(blob: bytes) -> str:
    """What the encoded file stores, e.g. 'CONV_2D CSR+DENSIFY, FULLY_CONNECTED 1x4'."""
    from pocketflow.export import sparse_tensors
    parts = [f"{t['op']} {'CSR' if t['block'] is None else '1x%d' % t['block']}{'+DENSIFY' if t['densify'] else ''}"
             for t in sparse_tensors(blob)]
    return ", ".join(parts) or "nothing encoded"


def runs(blob: bytes, x: np.ndarray, delegates: bool = True):
    """(outputs, None) or (None, first line of the interpreter's error)."""
    from pocketflow.metrics import TFLiteRunner
    try:
        return TFLiteRunner(blob, delegates=delegates).predict(x), None
    except Exception as e:
        return None, str(e).split("#")[0].strip()[:60]   # "failed to delegate FULLY_CONNECTED node"


def row(model, data, label: str, pattern: str, s: float, q: str | None) -> dict:
    from pocketflow import metrics as M
    from pocketflow.export import to_tflite
    from pocketflow.export.sparse import lost_nonzeros, rejection
    rep = data.representative() if q else None
    dense = to_tflite(model, q, rep)
    enc = to_tflite(model, q, rep, sparsity=True)
    x, shape = data.x_test[:256], tuple(model.input_shape[1:])
    ref, (got, err) = M.TFLiteRunner(dense).predict(x), runs(enc, x)
    step = M.TFLiteRunner(dense).out["quantization"][0] if q else None
    kernels = [w for w in model.weights if len(w.shape) >= 2]
    r = {"model": label, "pattern": pattern, "level": s, "tflite": q or "float",
         "sparsity": sum(int(np.sum(w.numpy() == 0)) for w in kernels) / sum(int(np.prod(w.shape)) for w in kernels),
         "dense_bytes": len(dense), "dense_gzip": M.gzip_size(dense), "sparse_bytes": len(enc),
         "sparse_gzip": M.gzip_size(enc), "holds": holds(enc), "runs": "yes" if err is None else f"no: {err}",
         "lost_nonzeros": lost_nonzeros(dense, enc), "dense_accuracy": M.tflite_accuracy(dense, data.x_test, data.y_test),
         "dense_ms": M.tflite_latency(dense, shape, 1)}
    r["raw_ratio"] = r["dense_bytes"] / r["sparse_bytes"]
    r["runs_builtin"] = "yes" if runs(enc, x[:8], delegates=False)[1] is None else "no"
    if err is None:
        r["diff_keras"] = float(np.max(np.abs(got - M.predict(model, x))))
        r["diff_dense"] = float(np.max(np.abs(got - ref)))
        r["diff_steps"] = r["diff_dense"] / step if step else None
        r["sparse_accuracy"] = M.tflite_accuracy(enc, data.x_test, data.y_test)
        r["sparse_ms"] = M.tflite_latency(enc, shape, 1)
    why = rejection(dense, enc, x[:16]) if len(enc) < len(dense) else "not smaller"
    r["auto"] = "encoded" if why is None else f"dense ({why.split(' (')[0]})"
    return r


def findings(rows: list[dict]) -> str:
    """The page's summary, read off the rows."""
    fl = [r for r in rows if r["tflite"] == "float"]
    q8 = [r for r in rows if r["tflite"] == "int8"]
    q8_ok = [f"{r['model']} {r['pattern']} {r['level']:.0%}" for r in q8 if r["runs"] == "yes"]
    gz_up = sorted({f"{r['level']:.0%}" for r in fl if r["sparse_gzip"] > r["dense_gzip"]})
    return (f"- float: the encoded file ran in XNNPACK {sum(r['runs'] == 'yes' for r in fl)}/{len(fl)} times, max diff "
            f"vs the dense file {max(r.get('diff_dense', np.inf) for r in fl):.2g}; raw "
            f"{min(r['raw_ratio'] for r in fl):.2f}x to {max(r['raw_ratio'] for r in fl):.2f}x smaller; gzip'd "
            f"larger than the dense file's at {', '.join(gz_up) or 'no level'} (index vectors deflate worse than "
            "runs of zeros), smaller above.\n"
            f"- int8: the encoded file ran in XNNPACK only for {', '.join(q8_ok) or 'none'} (a block-encoded "
            "FULLY_CONNECTED); CSR + DENSIFY on a FULLY_CONNECTED kernel fails XNNPACK's prepare ('failed to "
            "delegate FULLY_CONNECTED node'), though the built-in kernels run it. At 50% the int8 CSR file is "
            "larger than the dense one (index bytes exceed the int8 values saved). A 1x16 block encoding drops "
            "the trailing partial block of a row (2028 = 126x16 + 12 inputs): 'lost non-zeros' when that block "
            "held weights.\n"
            "- Conv2D kernels are encoded too, always as CSR + DENSIFY (expanded to dense at load: a smaller file, "
            "the same compute); FULLY_CONNECTED kernels get the 1x4 (float) / 1x16 (int8) block encoding when "
            "the zeros come in such blocks (the sparse kernel runs on the block format), else CSR + DENSIFY.\n"
            "- latency at batch 1: within noise of the dense file everywhere it runs (DENSIFY runs once, at "
            "load; this model is ~10-20 us).\n")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--levels", default="0.5,0.8,0.9,0.95")
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args(argv)
    import keras

    from pocketflow.data import load_dataset
    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    started = time.time()
    if a.quick:
        a.levels, a.epochs = "0.5,0.9", 1
    npz = ROOT / "tests" / "data" / "fashion_mnist_small.npz"
    data = load_dataset({"name": "npz", "path": str(npz), "val_split": 0.1})
    cases = [("unstructured", float(v)) for v in a.levels.split(",")] + [("2:4", 0.5), ("1x4", 0.9), ("1x16", 0.9)]
    rows = []
    for filters in (12, 16):   # 16 filters: the Dense layer's 13*13*16 = 2704 inputs are a multiple of 16
        keras.utils.set_random_seed(0)
        base = build_model("seed_cnn", data.input_shape, data.num_classes, {"filters": filters})
        Trainer(base, data, {"epochs": a.epochs, "batch_size": 64, "optimizer": "adam", "learning_rate": 2e-3,
                             "schedule": "constant", "verbose": False}).fit()
        label = "seed_cnn" if filters == 12 else "seed_cnn (16 filters)"
        for pattern, s in (cases if filters == 12 else [("1x16", 0.9)]):
            m = pruned(base, s, pattern)
            for q in (None, "int8"):
                rows.append(row(m, data, label, pattern, s, q))
                print(rows[-1]["model"], pattern, s, rows[-1]["tflite"], rows[-1]["raw_ratio"], rows[-1]["runs"],
                      flush=True)
    key = [("model", "model", ""), ("pattern", "pattern", ""), ("sparsity", "zeros", ".3f"), ("tflite", "TFLite", "")]
    size_cols = key + [("dense_bytes", "dense raw (B)", ",d"), ("sparse_bytes", "encoded raw (B)", ",d"),
                       ("raw_ratio", "raw dense/encoded", ".2f"), ("dense_gzip", "dense gzip (B)", ",d"),
                       ("sparse_gzip", "encoded gzip (B)", ",d"), ("holds", "encoded file holds", "")]
    run_cols = key + [("runs", "runs (XNNPACK)", ""), ("runs_builtin", "runs (no delegate)", ""),
                      ("lost_nonzeros", "lost non-zeros", ""), ("diff_keras", "max diff vs Keras", ".2g"),
                      ("diff_dense", "max diff vs dense file", ".2g"), ("diff_steps", "int8 steps", ".2f"),
                      ("dense_accuracy", "dense acc", ".4f"), ("sparse_accuracy", "encoded acc", ".4f"),
                      ("dense_ms", "dense ms", ".3f"), ("sparse_ms", "encoded ms", ".3f"),
                      ("auto", "sparse_encoding: auto ships", "")]
    shipped = [f"{r['model']} {r['pattern']} {r['level']:.0%} {r['tflite']} ({r['raw_ratio']:.2f}x raw)"
               for r in rows if r["auto"] == "encoded"]
    body = (f"The zoo's `seed_cnn` (Conv2D 3x3x1x12 = 108 weights, Dense 2028x10 = 20,280 weights) trained "
            f"{a.epochs} epoch(s) on the shipped sample (`tests/data/fashion_mnist_small.npz`, {len(data.x_train)} "
            f"train / {len(data.x_test)} test images), then every Conv2D/Dense kernel magnitude-pruned with numpy "
            "(`magnitude_mask`: unstructured, 2:4, or 1xB blocks of B consecutive inputs of one output channel), "
            "no fine-tuning (accuracies only compare the two files of the same weights). Each model converted "
            "with `to_tflite` (float; full-int8 with the sample's representative images), without (dense) and "
            "with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` (encoded). 'holds': the encoded file's sparse tensors "
            "(flatbuffer `sparsity` parameters), the kernel op they feed, CSR or block, and whether a DENSIFY op "
            "expands them at load. 'runs (XNNPACK)': `TFLiteRunner` as every measurement in PocketFlow runs it "
            "(ai_edge_litert, default delegates); 'no delegate': the built-in kernels only. Diffs on 256 test "
            "images; 'int8 steps': diff vs the dense int8 file in output quantization steps. Latency: "
            "`tflite_latency`, batch 1, 1 thread, median of 50 invokes. 'auto ships': what "
            "`export.sparse_encoding: auto` keeps (encoded only when smaller raw, run by XNNPACK, no non-zero "
            "lost, outputs within 1e-4 (float) / one step (int8) of the dense file's).\n\n"
            + findings(rows) + "\n## Size and what the file holds\n\n" + md_table(rows, size_cols)
            + "\n\n## Runs, outputs, latency (batch 1, 1 thread)\n\n" + md_table(rows, run_cols)
            + "\n\n`sparse_encoding: auto` ships the encoded file for: " + "; ".join(shipped or ["none"]) + ".\n")
    name = "sparse_encoding" + ("_quick" if a.quick else "")
    write_page(name, "sparse-encoding: TFLite's sparse tensor encoding, float and int8",
               "python scripts/benchmark.py sparse-encoding" + (" --quick" if a.quick else ""), body, started,
               {"rows": rows})


if __name__ == "__main__":
    main()
