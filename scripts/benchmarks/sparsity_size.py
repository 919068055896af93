"""sparsity-size: the seed CNN on Fashion-MNIST at 50/75/90/95 % sparsity, with and without int8:
test accuracy and gzip'd TFLite size, PocketFlow's weight_sparsity vs TFMOT prune_low_magnitude.

    python scripts/benchmarks/sparsity_size.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, dataset_npz, md_table, plot, run_learner, run_peer, tflite_row, write_page  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--levels", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ft-epochs", type=int, default=2)
    a = ap.parse_args(argv)
    import keras

    from pocketflow.data import load_dataset
    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    started = time.time()
    if a.quick:
        a.levels, a.epochs, a.ft_epochs = "0.5,0.9", 1, 1
    data = load_dataset({"name": "fashion_mnist", "val_split": 0.1, "limit_train": 6000 if a.quick else None})
    levels = [float(v) for v in a.levels.split(",")]
    keras.utils.set_random_seed(0)
    base = build_model("seed_cnn", data.input_shape, 10)
    Trainer(base, data, {"epochs": a.epochs, "batch_size": 128, "optimizer": "adam", "learning_rate": 1e-3,
                         "schedule": "constant", "verbose": False}).fit()
    rows = [tflite_row("baseline", base, data, None)]
    for s in levels:
        _, comp = run_learner(base, data, "weight_sparsity", a.ft_epochs, sparsity=s,
                              fine_tune={"epochs": a.ft_epochs, "learning_rate": 5e-4})
        for q in (None, "int8"):
            r = tflite_row(f"weight_sparsity {s:.0%}" + (" + int8" if q else ""), comp.deploy, data, q)
            r["sparsity"], r["level"], r["exact_size_bytes"] = comp.info.get("sparsity"), s, comp.size_bytes
            rows.append(r)
    npz = dataset_npz(data, Path("/tmp/sparsity_size_fmnist.npz"))
    peer = run_peer(npz, "--mode", "sparsity", "--levels", a.levels, "--epochs", a.epochs, "--ft-epochs", a.ft_epochs)
    for r in peer["rows"]:
        r["tool"] = "TFMOT"
        if "%" in r["name"]:
            r["level"] = float(r["name"].split()[1].rstrip("%")) / 100
    rows += peer["rows"]
    for r in rows:
        base_row = rows[0] if r["tool"] == "pocketflow" else peer["rows"][0]
        r["reduction"] = base_row["tflite_gzip_bytes"] / r["tflite_gzip_bytes"]
    cols = [("tool", "tool", ""), ("name", "model", ""), ("tflite_accuracy", "TFLite accuracy", ".4f"),
            ("tflite_gzip_bytes", "gzip'd TFLite (B)", ",.0f"), ("reduction", "reduction", ".2f"),
            ("exact_size_bytes", "sparse format (B)", ",.0f")]
    DOCS.mkdir(parents=True, exist_ok=True)

    def draw(ax):
        for tool, q, mk in (("pocketflow", False, "o-"), ("pocketflow", True, "o--"), ("TFMOT", False, "s-"),
                            ("TFMOT", True, "s--")):
            rs = [r for r in rows if r["tool"] == tool and "level" in r and ("int8" in r["name"]) == q]
            ax.plot([r["level"] for r in rs], [r["tflite_accuracy"] for r in rs], mk,
                    label=f"{tool}{' + int8' if q else ''}")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("TFLite test accuracy")
        ax.legend()
    name = "sparsity_size" + ("_quick" if a.quick else "")
    plot(DOCS / f"{name}.png", draw)
    body = (f"Seed CNN on Fashion-MNIST ({len(data.x_train)} train images), baseline {a.epochs} epochs, "
            f"each sparsity level fine-tuned {a.ft_epochs} epochs from the same baseline (per tool). "
            f"gzip level 9. 'sparse format' is PocketFlow's exact sparse representation (values + index "
            f"overhead, see learners/weight_sparsity.py).\n\n" + md_table(rows, cols)
            + f"\n\n![accuracy vs sparsity]({name}.png)\n")
    write_page(name, "sparsity-size: accuracy and gzip'd size vs sparsity", "python scripts/benchmark.py "
               "sparsity-size" + (" --quick" if a.quick else ""), body, started, {"rows": rows})


if __name__ == "__main__":
    main()
