"""Benchmark: the pretrained ResNet-20 (Fashion-MNIST) pruned to 2x fewer FLOPs, per criterion.

    python scripts/benchmarks/channel_pruning.py            # writes docs/benchmarks/channel_pruning.md

For each pruning shape (how the 2x is spread over the channel groups) and each criterion (which
channels a group keeps): project onto the FLOPs target, prune, measure test accuracy, fine-tune,
measure again. Then TFLite latency of the original and of each pruned architecture at batch 1
and 32, 1 and 2 threads, against the FLOPs speedup. The machine is shared: its load is recorded.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT.parent / "shared" / "models" / "resnet20_fashion_mnist.keras"


def _uniform(group) -> float:
    return 1.0


def _streams_first(group) -> float:
    return 0.5 if len(group.producers) > 1 else 1.0


# name -> (start point per group, channel multiple, description). The start point is projected
# onto the target along the learner's `scale`, so only its proportions matter.
SHAPES = {
    "uniform": (_uniform, 1, "every group at the same preserve ratio, any channel count"),
    "streams-x8": (_streams_first, 8, "residual streams (groups with several producers) pruned first, "
                   "channel counts at multiples of 8: the streams' activations are read and written by "
                   "every block, and XNNPACK's kernels work in blocks of 8 channels"),
}


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criteria", nargs="+", default=["l1", "reconstruction", "discrimination"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--target", type=float, default=2.0, help="FLOPs ratio")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--subset", type=int, default=60000, help="training images used for fine-tuning")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="fine-tune on labels only (default: also distil from the original model)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "channel_pruning.md"))
    return p.parse_args()


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _latencies(blobs: list, shape, rounds: int = 5) -> list[dict]:
    """Per model: (batch, threads) -> ms per invoke, the best of `rounds` medians.

    The models are measured in turn within each round so that load from other jobs on the shared
    machine hits them alike; the best round is the least disturbed one.
    """
    from pocketflow.metrics import tflite_latency
    out = [{} for _ in blobs]
    for batch in (1, 32):
        for threads in (1, 2):
            runs = 50 if batch == 1 else 10
            for _ in range(rounds):
                for res, blob in zip(out, blobs):
                    ms = tflite_latency(blob, shape, batch, threads, runs=runs)
                    res[(batch, threads)] = min(ms, res.get((batch, threads), float("inf")))
    return out


def main() -> int:
    a = _args()
    t_start = time.perf_counter()
    load_before = _load()
    import keras
    import numpy as np

    from pocketflow import metrics as M
    from pocketflow.config import load_config
    from pocketflow.data import load_dataset
    from pocketflow.export import to_tflite
    from pocketflow.learners import LEARNERS, Budget

    model = keras.saving.load_model(MODEL, compile=False)
    data = load_dataset({"name": "fashion_mnist", "val_split": 0.0})
    idx = np.sort(np.random.default_rng(0).permutation(len(data.x_train))[:a.subset])
    ft_data = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx], augment=True)
    base_acc = M.accuracy(model, data.x_test, data.y_test)
    print(f"original: test accuracy {base_acc:.4f}, {M.count_macs(model):,} MACs", flush=True)
    fine_tune = {"epochs": a.epochs, "batch_size": 128, "optimizer": "sgd", "learning_rate": a.lr,
                 "schedule": "cosine", "momentum": 0.9, "verbose": True}

    rows, archs = [], {}  # archs: shape -> (pruned model, info)
    for shape in a.shapes:
        start, multiple, _ = SHAPES[shape]
        for crit in a.criteria:
            cfg = load_config({"data": {"name": "fashion_mnist"}, "model": {"name": str(MODEL)},
                               "learner": {"name": "channel_pruning", "criterion": crit, "ratio_range": [0.1, 1.0],
                                           "channel_multiple": multiple, "fine_tune": fine_tune,
                                           "distill": {"enabled": a.distill}}})
            learner = LEARNERS.get("channel_pruning")(cfg["learner"], seed=0)
            point = {f"ratio/{g.name}": start(g) for g in learner.graph(model).prunable}
            params = learner.project(model, point, "flops", a.target)
            t0 = time.perf_counter()
            comp = learner.compress(model, params, ft_data, Budget(epochs=0))
            t_select = time.perf_counter() - t0
            acc0 = M.accuracy(comp.deploy, data.x_test, data.y_test)
            print(f"{shape} / {crit}: pruned in {t_select:.1f}s, accuracy before fine-tuning {acc0:.4f}", flush=True)
            keras.utils.set_random_seed(0)
            t0 = time.perf_counter()
            learner.fine_tune(comp.deploy, ft_data, Budget(epochs=a.epochs), teacher=model)
            t_ft = time.perf_counter() - t0
            acc1 = M.accuracy(comp.deploy, data.x_test, data.y_test)
            print(f"{shape} / {crit}: accuracy after fine-tuning {acc1:.4f} ({t_ft:.0f}s)", flush=True)
            rows.append((shape, crit, learner.measure(model, comp, "flops"), acc0, acc1, t_select, t_ft))
            archs[shape] = (comp.deploy, comp.info)  # the architecture does not depend on the criterion

    lat = _latencies([to_tflite(model)] + [to_tflite(m) for m, _ in archs.values()], tuple(model.input_shape[1:]))
    report = _report(a, rows, archs, base_acc, dict(zip(["original", *archs], lat)), model,
                     load_before, _load(), time.perf_counter() - t_start)
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(report)
    print(f"wrote {path}")
    return 0


def _report(a, rows, archs, base_acc, lat, model, load_before, load_after, wall) -> str:
    from pocketflow import metrics as M
    macs = M.count_macs(model)
    cmd = ("python scripts/benchmarks/channel_pruning.py " + " ".join(sys.argv[1:])).strip()
    n_ft = min(a.subset, 60000)
    out = [
        "# Channel pruning: ResNet-20 on Fashion-MNIST, 2x fewer FLOPs",
        "",
        f"- command: `{cmd}`",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- machine: {_cpu()}, {os.cpu_count()} cores, {platform.platform()}; shared with other jobs "
        f"(load average 1/5/15 min: {load_before} at start, {load_after} at end)",
        f"- wall time: {wall / 60:.1f} min",
        f"- model: `{MODEL.relative_to(ROOT.parent)}` ({M.count_params(model):,} params, {macs:,} MACs), "
        f"test accuracy {base_acc:.4f} on the 10 000 test images",
        f"- target: {a.target:g}x FLOPs (MACs), met by `learner.project` from each shape's start point",
        f"- fine-tuning: {a.epochs:g} epochs on {'all' if n_ft == 60000 else 'a seeded subset of'} {n_ft:,} "
        f"training images, SGD (Nesterov momentum 0.9), cosine learning rate from {a.lr:g}, batch 128, random "
        "2-pixel shift + flip (as the baseline was trained), L2 1e-4 on convs (kept from the model), "
        + ("distillation from the original (T=4, weight 0.5)" if a.distill else "no distillation"),
        "- calibration for reconstruction / discrimination: 512 training images (never test)",
        "",
        "Pruning shapes:",
        "",
    ]
    out += [f"- `{s}`: {SHAPES[s][2]}" for s in archs]
    out += ["", "## Accuracy (10 000 test images)", "",
            "| shape | criterion | FLOPs ratio | before fine-tuning | after fine-tuning | vs original "
            "| pruning time | fine-tuning time |", "|---|---|---|---|---|---|---|---|"]
    for shape, crit, ratio, acc0, acc1, ts, tf in rows:
        out.append(f"| {shape} | {crit} | {ratio:.3f}x | {acc0:.4f} | {acc1:.4f} | {100 * (acc1 - base_acc):+.2f} pt "
                   f"| {ts:.0f} s | {tf / 60:.1f} min |")
    shapes = list(archs)
    out += ["", "## Channels kept per group", "",
            "The shape and the projection decide the counts, the criterion only which channels.", "",
            "| group (first producer) | producers | " + " | ".join(shapes) + " |",
            "|---|---|" + "---|" * len(shapes)]
    first = archs[shapes[0]][1]
    for name in first["channels"]:
        cells = [f"{k} / {n} ({k / n:.2f})" for k, n in (archs[s][1]["channels"][name] for s in shapes)]
        out.append(f"| {name} | {', '.join(first['groups'][name])} | " + " | ".join(cells) + " |")
    out += ["", "## TFLite latency (float32, XNNPACK)", "",
            "ms per invoke: best of 5 interleaved rounds, each the median of 50 invokes (batch 1) or 10 (batch 32).",
            "", "| shape | FLOPs speedup | batch | threads | original ms | pruned ms | latency speedup "
            "| latency / FLOPs speedup |", "|---|---|---|---|---|---|---|---|"]
    for s in shapes:
        fs = macs / M.count_macs(archs[s][0])
        for key in sorted(lat["original"]):
            sp = lat["original"][key] / lat[s][key]
            out.append(f"| {s} | {fs:.3f}x | {key[0]} | {key[1]} | {lat['original'][key]:.3f} | {lat[s][key]:.3f} "
                       f"| {sp:.2f}x | {sp / fs:.2f} |")
    out += ["", f"Goals: reconstruction within 1.0 pt of {base_acc:.4f} after fine-tuning; latency speedup "
            ">= 0.8x the FLOPs speedup.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
