"""The TFMOT peer pipeline (legacy tf_keras), run in its own process by the benchmark suites.

Reproduces the TensorFlow blog / TFMOT collaborative-optimization recipe on the seed CNN:
baseline, pruned (80 %), QAT, PQAT (pruning-preserving QAT), PCQAT (pruning + sparsity-preserving
clustering + cluster-preserving QAT), each exported to TFLite and measured with ai_edge_litert.

    TF_USE_LEGACY_KERAS=1 python scripts/benchmarks/tfmot_peer.py --data mnist.npz --out peer.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def load(path, limit=None):
    with np.load(path) as z:
        xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
    if limit:
        xtr, ytr = xtr[:limit], ytr[:limit]
    f = lambda x: (x.astype("float32") / 255.0).reshape(len(x), 28, 28)  # noqa: E731
    return f(xtr), ytr.astype("int32"), f(xte), yte.astype("int32")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("blog", "sparsity"), default="blog",
                    help="blog: the TF blog table; sparsity: prune_low_magnitude at --levels, ± int8")
    ap.add_argument("--levels", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--save-dir", default=None, help="also write every row's TFLite file here")
    a = ap.parse_args(argv)

    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras as keras

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from pocketflow.metrics import gzip_size, tflite_accuracy, tflite_latency

    keras.utils.set_random_seed(a.seed)
    xtr, ytr, xte, yte = load(a.data, a.limit)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def fit(m, epochs, callbacks=()):
        m.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
        m.fit(xtr, ytr, batch_size=128, epochs=int(np.ceil(epochs)), verbose=0, validation_split=0.1,
              callbacks=list(callbacks))
        return m

    def acc(m):
        return float(np.mean(np.argmax(m.predict(xte, batch_size=512, verbose=0), -1) == yte))

    def tflite(m, quant):
        c = tf.lite.TFLiteConverter.from_keras_model(m)
        if quant:
            c.optimizations = [tf.lite.Optimize.DEFAULT]
        return c.convert()

    def row(name, m, quant):
        blob = tflite(m, quant)
        if a.save_dir:
            os.makedirs(a.save_dir, exist_ok=True)
            slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            with open(os.path.join(a.save_dir, f"{slug}.tflite"), "wb") as f:
                f.write(blob)
        r = {"name": name, "keras_accuracy": acc(m), "tflite_accuracy": tflite_accuracy(blob, xte, yte),
             "tflite_bytes": len(blob), "tflite_gzip_bytes": gzip_size(blob),
             "latency_ms_b1": tflite_latency(blob, (28, 28), 1), "latency_ms_b32": tflite_latency(blob, (28, 28), 32)}
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "m.h5")
            keras.models.save_model(m, p, include_optimizer=False)
            r["h5_gzip_bytes"] = gzip_size(p)
        return r

    def copy(m):  # TFMOT wrappers share the wrapped layers: every pipeline starts from a copy
        c = keras.models.clone_model(m)
        c.set_weights(m.get_weights())
        return c

    def prune(m, sparsity):
        steps = int(np.ceil(len(xtr) * 0.9 / 128) * a.ft_epochs)
        end = max(1, int(steps * 0.8))
        sched = tfmot.sparsity.keras.PolynomialDecay(0.0, sparsity, 0, end, frequency=max(1, end // 20))
        pr = tfmot.sparsity.keras.prune_low_magnitude(copy(m), pruning_schedule=sched)
        fit(pr, a.ft_epochs, [tfmot.sparsity.keras.UpdatePruningStep()])
        return tfmot.sparsity.keras.strip_pruning(pr)

    def measured_sparsity(m):
        ws = [w for w in m.get_weights() if w.ndim > 1]
        return float(sum((w == 0).sum() for w in ws) / sum(w.size for w in ws))

    t0 = time.time()
    base = keras.Sequential([keras.layers.InputLayer((28, 28)), keras.layers.Reshape((28, 28, 1)),
                             keras.layers.Conv2D(12, 3, activation="relu"), keras.layers.MaxPooling2D(2),
                             keras.layers.Flatten(), keras.layers.Dense(10)])
    fit(base, a.epochs)
    rows = [row("baseline", base, False)]

    if a.mode == "sparsity":
        for level in [float(v) for v in a.levels.split(",")]:
            pruned = prune(base, level)
            for quant in (False, True):
                r = row(f"prune_low_magnitude {level:.0%}" + (" + int8" if quant else ""), pruned, quant)
                r["sparsity"] = measured_sparsity(pruned)
                rows.append(r)
        return dump(rows, t0, a)

    pruned = prune(base, a.sparsity)
    rows.append(row("pruned (float TFLite)", pruned, False))
    rows[-1]["sparsity"] = measured_sparsity(pruned)

    qat = tfmot.quantization.keras.quantize_model(copy(base))
    fit(qat, 1)
    rows.append(row("QAT + TFLite int8", qat, True))

    pq = tfmot.quantization.keras.quantize_annotate_model(copy(pruned))
    pqat = tfmot.quantization.keras.quantize_apply(
        pq, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())
    fit(pqat, 1)
    rows.append(row("pruned + QAT + TFLite (PQAT)", pqat, True))

    cl = tfmot.clustering.keras
    clustered = cl.cluster_weights(copy(pruned), number_of_clusters=a.clusters,
                                   cluster_centroids_init=cl.CentroidInitialization.KMEANS_PLUS_PLUS,
                                   preserve_sparsity=True)
    fit(clustered, 1)
    clustered = cl.strip_clustering(clustered)
    ca = tfmot.quantization.keras.quantize_annotate_model(clustered)
    pcqat = tfmot.quantization.keras.quantize_apply(
        ca, tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True))
    fit(pcqat, 1)
    rows.append(row("pruned + clustered + QAT + TFLite (PCQAT)", pcqat, True))

    return dump(rows, t0, a)


def dump(rows, t0, a):
    import tensorflow as tf
    out = {"tool": "tfmot", "tf": tf.__version__, "rows": rows, "seconds": time.time() - t0,
           "settings": vars(a)}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
