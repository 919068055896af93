"""seed-table: the TensorFlow blog's MNIST table, produced by PocketFlow's learners and by TFMOT
(tf_keras, its own process) in the same run, on the same data split.

    python scripts/benchmarks/seed_table.py [--quick] [--data ../shared/data/mnist.npz]

Sizes are gzip'd files (as the blog's 9.71x: 78 117 B -> 8 044 B); the reduction factor is
against the gzip'd float TFLite baseline of the same tool. Each number is the median of
--reps runs with different seeds, the spread (max - min) beside it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DOCS, ROOT, dataset_npz, md_table, plot, run_learner, run_peer,  # noqa: E402
                    tflite_row, write_page)

PIPELINES = [  # (row name, learner, learner config, TFLite quantization)
    ("pruned + TFLite", "weight_sparsity", "sparse", None),
    ("QAT + TFLite", "uniform_quant", "qat", "int8"),
    ("pruned + QAT + TFLite", "chain", "pqat", "int8"),
    ("pruned + clustered + QAT + TFLite", "chain", "pcqat", "int8"),
    ("more pruned + fewer clusters + QAT + TFLite", "chain", "goal", "int8"),
]


def configs(a):
    ft = {"epochs": a.ft_epochs, "learning_rate": 5e-4}
    sparse = {"sparsity": a.sparsity, "fine_tune": ft}
    return {
        "sparse": sparse,
        "qat": {"bits": 8, "fine_tune": {"epochs": 1, "learning_rate": 2e-4}},
        "pqat": {"steps": ["weight_sparsity", "uniform_quant"], "fine_tune": ft,
                 "weight_sparsity": {"sparsity": a.sparsity}, "uniform_quant": {"bits": 8}},
        "pcqat": {"steps": ["weight_sparsity", "nonuniform_quant", "uniform_quant"], "fine_tune": ft,
                  "weight_sparsity": {"sparsity": a.sparsity}, "nonuniform_quant": {"bits": a.cluster_bits},
                  "uniform_quant": {"bits": 8}},
        "goal": {"steps": ["weight_sparsity", "nonuniform_quant", "uniform_quant"], "fine_tune": ft,
                 "weight_sparsity": {"sparsity": a.goal_sparsity},
                 "nonuniform_quant": {"bits": a.goal_cluster_bits}, "uniform_quant": {"bits": 8}},
    }


def ours(a, data, seed):
    import keras

    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(seed)
    base = build_model("seed_cnn", data.input_shape, 10)
    Trainer(base, data, {"epochs": a.epochs, "batch_size": 128, "optimizer": "adam", "learning_rate": 1e-3,
                         "schedule": "constant", "verbose": False}, seed=seed).fit()
    rows = [tflite_row("baseline", base, data, None)]
    cfgs = configs(a)
    for name, learner, key, quant in PIPELINES:
        cfg = dict(cfgs[key])
        epochs = cfg["fine_tune"]["epochs"]
        _, comp = run_learner(base, data, learner, epochs, seed=seed, **cfg)
        rows.append(tflite_row(name, comp.deploy, data, quant))
        rows[-1]["exact_size_bytes"] = comp.size_bytes
    return rows


def median_rows(runs: list[list[dict]]) -> list[dict]:
    out = []
    for i, r0 in enumerate(runs[0]):
        row = {"tool": r0["tool"], "name": r0["name"]}
        for k in ("tflite_accuracy", "tflite_gzip_bytes", "tflite_bytes", "latency_ms_b1", "latency_ms_b32"):
            vals = [run[i][k] for run in runs]
            row[k] = float(np.median(vals))
            row[k + "_spread"] = float(max(vals) - min(vals))
        out.append(row)
    base = out[0]["tflite_gzip_bytes"]
    for r in out:
        r["reduction"] = base / r["tflite_gzip_bytes"]
        r["acc_delta_pt"] = 100 * (r["tflite_accuracy"] - out[0]["tflite_accuracy"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--cluster-bits", type=int, default=4)
    ap.add_argument("--goal-sparsity", type=float, default=0.9, help="our extra row, aimed at the 15x goal")
    ap.add_argument("--goal-cluster-bits", type=int, default=3)
    a = ap.parse_args(argv)
    from pocketflow.data import load_dataset
    started = time.time()
    limit = 6000 if a.quick else None
    if a.quick:
        a.reps, a.epochs, a.ft_epochs = 1, 1, 1
    data = load_dataset({"name": "npz", "path": a.data, "val_split": 0.1, "limit_train": limit})
    npz = dataset_npz(data, Path("/tmp") / f"seed_table_{Path(a.data).stem}.npz")
    ours_runs, peer_runs = [], []
    for seed in range(a.reps):
        ours_runs.append(ours(a, data, seed))
        peer = run_peer(npz, "--epochs", a.epochs, "--ft-epochs", a.ft_epochs, "--sparsity", a.sparsity,
                        "--clusters", 2 ** a.cluster_bits, "--seed", seed)
        peer_runs.append([{**r, "tool": "TFMOT"} for r in peer["rows"]])
    rows = median_rows(ours_runs) + median_rows(peer_runs)
    cols = [("tool", "tool", ""), ("name", "pipeline", ""), ("tflite_accuracy", "TFLite accuracy", ".4f"),
            ("acc_delta_pt", "Δ acc (pt)", "+.2f"), ("tflite_gzip_bytes", "gzip'd TFLite (B)", ",.0f"),
            ("tflite_gzip_bytes_spread", "± (B)", ",.0f"), ("reduction", "reduction", ".2f"),
            ("tflite_bytes", "TFLite (B)", ",.0f"), ("latency_ms_b1", "latency b1 (ms)", ".3f"),
            ("latency_ms_b32", "latency b32 (ms)", ".3f")]
    best = max((r for r in rows if r["tool"] == "pocketflow"), key=lambda r: r["reduction"]
               if r["acc_delta_pt"] >= -0.2 else 0)
    png = DOCS / "seed_table.png"
    DOCS.mkdir(parents=True, exist_ok=True)

    def draw(ax):
        for tool, mk in (("pocketflow", "o"), ("TFMOT", "s")):
            rs = [r for r in rows if r["tool"] == tool]
            ax.scatter([r["reduction"] for r in rs], [r["tflite_accuracy"] for r in rs], marker=mk, label=tool)
        ax.set_xlabel("gzip'd size reduction (x)")
        ax.set_ylabel("TFLite test accuracy")
        ax.set_xscale("log")
        ax.legend()
    plot(png, draw)
    body = (f"Seed CNN (Reshape → Conv2D 12@3×3 → MaxPool → Flatten → Dense 10) on {Path(a.data).name} "
            f"({len(data.x_train)} train / {len(data.x_val)} val / {len(data.x_test)} test). Baseline "
            f"{a.epochs} epochs Adam; fine-tunes {a.ft_epochs} epochs; sparsity {a.sparsity}; clustering "
            f"{2 ** a.cluster_bits} clusters (the same settings for both tools); PocketFlow's last row uses "
            f"sparsity {a.goal_sparsity} and {2 ** a.goal_cluster_bits} clusters; {a.reps} seed(s), median shown, ± = max − min.\n\n"
            + md_table(rows, cols)
            + f"\n\nGoal: ≥ 15× smaller gzip'd than the gzip'd float baseline at accuracy ≥ baseline − 0.2 pt. "
            f"Best PocketFlow row within 0.2 pt: **{best['name']}**, {best['reduction']:.2f}× "
            f"({best['acc_delta_pt']:+.2f} pt).\n\n![accuracy vs reduction](seed_table.png)\n")
    cmd = "python scripts/benchmark.py seed-table" + (" --quick" if a.quick else "")
    write_page("seed_table" + ("_quick" if a.quick else ""), "seed-table: TF blog MNIST table, PocketFlow vs TFMOT",
               cmd, body, started, {"rows": rows, "settings": vars(a)})


if __name__ == "__main__":
    main()
