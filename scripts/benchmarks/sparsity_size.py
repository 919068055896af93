"""sparsity-size: the seed CNN on Fashion-MNIST at 50/75/90/95 % sparsity, with and without int8:
test accuracy and gzip'd TFLite size, PocketFlow's weight_sparsity vs TFMOT prune_low_magnitude.

    python scripts/benchmarks/sparsity_size.py [--quick]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, dataset_npz, md_table, plot, run_learner, run_peer, tflite_row, write_page  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--levels", default="0.5,0.75,0.9,0.95")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="seeds; the median is shown with its spread")
    a = ap.parse_args(argv)
    import keras

    from pocketflow.data import load_dataset
    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    started = time.time()
    if a.quick:
        a.levels, a.epochs, a.ft_epochs, a.reps = "0.5,0.9", 1, 1, 1
    data = load_dataset({"name": "fashion_mnist", "val_split": 0.1, "limit_train": 3000 if a.quick else None,
                         "limit_test": 2000 if a.quick else None})
    levels = [float(v) for v in a.levels.split(",")]
    # the TFMOT peer's schedule and optimizer: PolynomialDecay 0 -> s from step 0 to 80% of the
    # fine-tuning, a mask update every end // 20 steps, Adam 1e-3 constant
    steps = math.ceil(len(data.x_train) / 128) * a.ft_epochs
    end = max(1, int(steps * 0.8))
    npz = dataset_npz(data, Path("/tmp/sparsity_size_fmnist.npz"))

    def ours(seed):
        keras.utils.set_random_seed(seed)
        base = build_model("seed_cnn", data.input_shape, 10)
        Trainer(base, data, {"epochs": a.epochs, "batch_size": 128, "optimizer": "adam", "learning_rate": 1e-3,
                             "schedule": "constant", "verbose": False}, seed=seed).fit()
        out = [tflite_row("baseline", base, data, None)]
        for s in levels:
            _, comp = run_learner(base, data, "weight_sparsity", a.ft_epochs, seed=seed, sparsity=s, end_step=end,
                                  frequency=max(1, end // 20),
                                  fine_tune={"epochs": a.ft_epochs, "learning_rate": 1e-3})
            for q in (None, "int8"):
                r = tflite_row(f"weight_sparsity {s:.0%}" + (" + int8" if q else ""), comp.deploy, data, q)
                layers = comp.info.get("layers", {})
                r["sparsity"] = sum(v["zeros"] for v in layers.values()) / max(1, sum(
                    math.prod(v["shape"]) for v in layers.values()))
                r["level"], r["exact_size_bytes"] = s, comp.size_bytes
                out.append(r)
        return out

    def median(runs):
        med = []
        for i, r0 in enumerate(runs[0]):
            r = dict(r0)
            for k in ("tflite_accuracy", "tflite_gzip_bytes", "sparsity", "exact_size_bytes"):
                vals = [run[i][k] for run in runs if run[i].get(k) is not None]
                if vals:
                    r[k] = float(np.median(vals))
                    r[k + "_spread"] = float(max(vals) - min(vals))
            med.append(r)
        return med

    ours_runs, peer_runs = [], []
    for seed in range(a.reps):
        ours_runs.append(ours(seed))
        peer_runs.append(run_peer(npz, "--mode", "sparsity", "--levels", a.levels, "--epochs", a.epochs,
                                  "--ft-epochs", a.ft_epochs, "--seed", seed)["rows"])
        print(f"seed {seed} done", flush=True)
    rows = median(ours_runs)
    peer = {"rows": median(peer_runs)}
    for r in peer["rows"]:
        r["tool"] = "TFMOT"
        if "%" in r["name"]:
            r["level"] = float(r["name"].split()[1].rstrip("%")) / 100
    rows += peer["rows"]
    for r in rows:
        base_row = rows[0] if r["tool"] == "pocketflow" else peer["rows"][0]
        r["reduction"] = base_row["tflite_gzip_bytes"] / r["tflite_gzip_bytes"]
        r["delta_pt"] = 100 * (r["tflite_accuracy"] - base_row["tflite_accuracy"])
    cols = [("tool", "tool", ""), ("name", "model", ""), ("sparsity", "measured sparsity", ".3f"),
            ("tflite_accuracy", "TFLite accuracy", ".4f"), ("tflite_accuracy_spread", "± acc", ".4f"),
            ("delta_pt", "Δ vs own baseline (pt)", "+.2f"),
            ("tflite_gzip_bytes", "gzip'd TFLite (B)", ",.0f"), ("tflite_gzip_bytes_spread", "± (B)", ",.0f"),
            ("reduction", "reduction", ".2f"), ("exact_size_bytes", "sparse format (B)", ",.0f")]
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
    cmp_rows = []
    for s in levels:
        for q in (False, True):
            pick = lambda tool: next((r for r in rows if r["tool"] == tool and r.get("level") == s  # noqa: E731
                                      and ("int8" in r["name"]) == q), None)
            o, t = pick("pocketflow"), pick("TFMOT")
            if o is None or t is None:
                continue
            cmp_rows.append({"level": f"{s:.0%}", "quant": "int8" if q else "float",
                             "ours_delta": o["delta_pt"], "tfmot_delta": t["delta_pt"],
                             "ours_gz": o["tflite_gzip_bytes"], "tfmot_gz": t["tflite_gzip_bytes"],
                             "acc": "ours" if o["delta_pt"] > t["delta_pt"] else ("tie" if o["delta_pt"] == t["delta_pt"]
                                                                                 else "**TFMOT**"),
                             "size": "ours" if o["tflite_gzip_bytes"] < t["tflite_gzip_bytes"] else "**TFMOT**"})
    cmp_cols = [("level", "sparsity", ""), ("quant", "TFLite", ""), ("ours_delta", "ours Δ (pt)", "+.2f"),
                ("tfmot_delta", "TFMOT Δ (pt)", "+.2f"), ("ours_gz", "ours gzip'd (B)", ",.0f"),
                ("tfmot_gz", "TFMOT gzip'd (B)", ",.0f"), ("acc", "more accurate", ""), ("size", "smaller", "")]
    lost = [f"{r['level']} {r['quant']}" for r in cmp_rows if "TFMOT" in r["acc"] or "TFMOT" in r["size"]]
    body = (f"Seed CNN on Fashion-MNIST ({len(data.x_train)} train images), baseline {a.epochs} epochs, "
            f"each sparsity level fine-tuned {a.ft_epochs} epochs from the same baseline (per tool), both "
            f"tools with the same schedule (polynomial, power 3, 0 → s from step 0 to step {end}, masks updated "
            f"every {max(1, end // 20)} steps, all Conv2D/Dense kernels pruned) and optimizer (Adam 1e-3, batch 128). "
            f"'+ int8': PocketFlow exports full-integer int8 (weights and activations); the TFMOT peer converts "
            f"its pruned model with `Optimize.DEFAULT` and no representative data, i.e. dynamic-range int8 "
            f"(int8 weights, float activations) — the same weight bytes, float compute. "
            f"gzip level 9. 'sparse format' is PocketFlow's exact sparse representation (values + index "
            f"overhead, see learners/weight_sparsity.py). Each tool trains its own baseline the same way "
            f"per seed, so accuracies are compared as the change from that tool's own baseline. {a.reps} "
            f"seed(s): median shown, ± = max − min over the seeds; differences smaller than the spread are "
            f"noise.\n\n"
            + md_table(rows, cols)
            + "\n\n## Side by side (Δ = change from the tool's own float baseline)\n\n" + md_table(cmp_rows, cmp_cols)
            + ("\n\nWhere TFMOT wins (accuracy or size): " + ", ".join(lost) + "." if lost
               else "\n\nPocketFlow is at least as accurate and at least as small at every level.")
            + f"\n\n![accuracy vs sparsity]({name}.png)\n")
    write_page(name, "sparsity-size: accuracy and gzip'd size vs sparsity", "python scripts/benchmark.py "
               "sparsity-size" + (" --quick" if a.quick else ""), body, started, {"rows": rows})


if __name__ == "__main__":
    main()
