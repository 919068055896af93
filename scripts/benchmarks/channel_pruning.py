"""Benchmark: the pretrained ResNet-20 (Fashion-MNIST) pruned to 2x fewer FLOPs, per criterion.

    python scripts/benchmarks/channel_pruning.py            # docs/benchmarks/channel_pruning.{md,json,png}
    python scripts/benchmarks/channel_pruning.py --quick    # < 2 min smoke run: channel_pruning_quick.*

1. Why latency follows FLOPs or not: TFLite (XNNPACK) time of one 3x3 conv against its number of
   output and input channels, on this machine.
2. Architectures at the FLOPs target, projected by the learner from uniform preserve ratios: its
   default (`channel_tile` 32 counts re-rounded by the per-layer latency table, `latency_aware`),
   the same counts rounded for FLOPs only (`latency_aware: false`, the previous default), any
   count and multiples of 8; plus one projected on a measured-latency target.
3. For the default architecture, each criterion (l1, reconstruction, discrimination) selects the
   channels; test accuracy before and after fine-tuning (SGD Nesterov + cosine, as the original
   was trained, with distillation from the original).
4. TFLite latency of the original and of every architecture at batch 1 and 32, 1 and 2 threads,
   in interleaved rounds (the machine is shared: fastest invoke, medians beside, load average
   recorded), and the TFLite op counts of every graph (surgery must not add ops).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from common import cpu_name, load_avg  # noqa: E402
MODEL = ROOT.parent / "shared" / "models" / "resnet20_fashion_mnist.keras"

# name -> (learner keys, description); every architecture is projected from uniform ratios.
# The first is the learner's default and the one every criterion is fine-tuned on.
ARCHS = {
    "latency-aware": ({}, "learner default: `channel_tile` 32 counts, re-rounded by the per-layer latency "
                          "table measured on this machine (`latency_aware`, `exchange_range` 0.25)"),
    "tile-32": ({"latency_aware": False}, "counts <= 16 any, above that multiples of 32, rounded for FLOPs only "
                                          "(the previous default)"),
    "any-count": ({"channel_tile": 0, "latency_aware": False}, "any channel count (the first version of this "
                                                               "benchmark)"),
    "multiple-8": ({"channel_tile": 0, "channel_multiple": 8, "latency_aware": False},
                   "multiples of 8, no tile rule"),
}
DEFAULT = next(iter(ARCHS))


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--criteria", nargs="+", default=["l1", "reconstruction", "discrimination"])
    p.add_argument("--target", type=float, default=2.0, help="FLOPs ratio")
    p.add_argument("--latency-target", type=float, default=1.6,
                   help="also project one architecture on measured latency (0 = skip)")
    p.add_argument("--epochs", type=float, default=1.5, help="fine-tuning epochs over --subset images")
    p.add_argument("--subset", type=int, default=60000, help="training images used for fine-tuning")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--test-subset", type=int, default=0,
                   help="seeded subset of the test images for the accuracies (0 = all 10 000)")
    p.add_argument("--calibration", type=int, default=512, help="images for reconstruction / discrimination")
    p.add_argument("--rounds", type=int, default=7, help="interleaved latency rounds (best is kept)")
    p.add_argument("--no-distill", dest="distill", action="store_false",
                   help="fine-tune on labels only (default: also distil from the original model)")
    p.add_argument("--archs", nargs="+", choices=list(ARCHS), default=None,
                   help=f"architectures to compare (default all; always includes {DEFAULT})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2000 training / 2000 test images, 0.25 epoch, 2 latency rounds, two "
                        "architectures, a shorter conv sweep; writes channel_pruning_quick.*")
    p.add_argument("--name", default=None, help="page name under docs/benchmarks (default channel_pruning[_quick])")
    a = p.parse_args()
    if a.quick:
        a.subset, a.epochs, a.calibration, a.rounds = min(a.subset, 2000), min(a.epochs, 0.25), 128, 2
        a.test_subset = a.test_subset or 2000
        a.archs = a.archs or [DEFAULT, "tile-32"]
        a.latency_target = 0.0  # the bisection converts a dozen models: minutes
    a.archs = [DEFAULT] + [n for n in (a.archs or ARCHS) if n != DEFAULT]
    a.name = a.name or ("channel_pruning_quick" if a.quick else "channel_pruning")
    return a


def _flags() -> str:
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if f in have)


def _latencies(blobs: dict, shape, rounds: int) -> tuple[dict, dict]:
    """name -> {(batch, threads): ms} twice: the fastest single invoke over all rounds, and the
    best round's median (per round: 50 invokes at batch 1, 8 at batch 32).

    All models are measured in turn within a round (the order rotates between rounds), so load
    from other jobs on the shared machine hits them alike. Other jobs can only slow an invoke down, so the fastest invoke is
    the estimate of the model's own cost; the median is shown too, as what a busy machine gives.
    """
    import numpy as np

    from pocketflow.metrics import TFLiteRunner, invoke_ms
    fast = {k: {} for k in blobs}
    med = {k: {} for k in blobs}
    for batch, threads in ((1, 1), (1, 2), (32, 1), (32, 2)):
        runs = 50 if batch == 1 else 8
        x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
        runners = {k: TFLiteRunner(blob, threads=threads, batch=batch) for k, blob in blobs.items()}
        names = list(runners)
        for i in range(rounds):
            for k in names[i % len(names):] + names[:i % len(names)]:  # each model leads a round in turn
                ts = invoke_ms(runners[k], x, runs, warmup=3)
                key = (batch, threads)
                fast[k][key] = min(fast[k].get(key, float("inf")), float(np.min(ts)))
                med[k][key] = min(med[k].get(key, float("inf")), float(np.median(ts)))
    return fast, med


def _ops(blob: bytes) -> dict:
    """TFLite op name -> how many times it occurs in the graph."""
    from collections import Counter

    from pocketflow.metrics import tflite_interpreter
    return dict(sorted(Counter(d["op_name"] for d in tflite_interpreter(blob)._get_ops_details()).items()))


def _conv_sweep(rounds: int, short: bool = False) -> list[dict]:
    """One 3x3 'same' conv + ReLU at batch 32, 1 thread: ms against output / input channels."""
    import keras
    import numpy as np

    from pocketflow.export import to_tflite
    from pocketflow.metrics import TFLiteRunner, invoke_ms
    L = keras.layers
    cases = [("out", 14, 32, c) for c in ((8, 16, 20, 32, 40, 64) if short else (8, 12, 16, 20, 24, 28, 32, 40, 48,
                                                                                 56, 64))]
    cases += [("in", 14, c, 32) for c in ((16, 32, 64) if short else (8, 16, 24, 32, 48, 64))]
    blobs = {}
    for side, hw, cin, cout in cases:
        i = keras.Input((hw, hw, cin))
        conv = L.Conv2D(cout, 3, padding="same", activation="relu")
        blobs[(side, hw, cin, cout)] = to_tflite(keras.Model(i, conv(i)))
    best = {}
    for _ in range(max(3, rounds)):
        for k, blob in blobs.items():
            r = TFLiteRunner(blob, threads=1, batch=32)
            x = np.random.default_rng(0).random((32, k[1], k[1], k[2]), dtype=np.float32)
            best[k] = min(best.get(k, float("inf")), float(invoke_ms(r, x, 8, warmup=1).min()))
    rows = []
    for (side, hw, cin, cout), ms in best.items():
        macs = 32 * hw * hw * 9 * cin * cout
        rows.append({"vary": side, "hw": hw, "cin": cin, "cout": cout, "ms": ms, "ns_per_kmac": 1e6 * ms / macs * 1e3})
    return rows


def main() -> int:
    a = _args()
    t_start = time.perf_counter()
    load_before = load_avg()
    import keras
    import numpy as np

    from pocketflow import metrics as M
    from pocketflow.config import load_config
    from pocketflow.data import load_dataset
    from pocketflow.export import to_tflite
    from pocketflow.learners import LEARNERS, Budget

    model = keras.saving.load_model(a.model, compile=False)
    data = load_dataset({"name": "fashion_mnist", "val_split": 0.0})
    idx = np.sort(np.random.default_rng(0).permutation(len(data.x_train))[:a.subset])
    ft_data = dataclasses.replace(data, x_train=data.x_train[idx], y_train=data.y_train[idx], augment=True)
    if a.test_subset:
        it = np.sort(np.random.default_rng(1).permutation(len(data.x_test))[:a.test_subset])
        data = dataclasses.replace(data, x_test=data.x_test[it], y_test=data.y_test[it])
    base_acc = M.accuracy(model, data.x_test, data.y_test)
    shape = tuple(model.input_shape[1:])
    print(f"original: test accuracy {base_acc:.4f}, {M.count_macs(model):,} MACs", flush=True)
    fine_tune = {"epochs": a.epochs, "batch_size": 128, "optimizer": "sgd", "learning_rate": a.lr,
                 "schedule": "cosine", "momentum": 0.9, "verbose": True}

    def make(crit: str, **keys):
        cfg = load_config({"data": {"name": "fashion_mnist"}, "model": {"name": str(a.model)},
                           "learner": {"name": "channel_pruning", "criterion": crit, "ratio_range": [0.1, 1.0],
                                       "calibration_images": a.calibration, "fine_tune": fine_tune,
                                       "distill": {"enabled": a.distill}, **keys}})
        return LEARNERS.get("channel_pruning")(cfg["learner"], seed=0)

    # -- architectures: projection of uniform ratios onto the target -----------------------------------
    archs = {}  # name -> dict(params, counts, flops, learner keys)
    for name in a.archs:
        keys = ARCHS[name][0]
        lr = make("l1", **keys)
        g = lr.graph(model)
        t_table = 0.0
        if lr.cfg["latency_aware"]:  # measured once per machine, then read from the cache
            t0 = time.perf_counter()
            lr.latency_table(model)
            t_table = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = lr.project(model, {f"ratio/{gr.name}": 1.0 for gr in g.prunable}, "flops", a.target)
        counts = lr._counts(g, p)
        archs[name] = {"keys": keys, "params": p, "flops": lr.predict_ratio(model, p, "flops"),
                       "channels": {gr.name: [counts[gr.id], gr.size] for gr in g.prunable},
                       "groups": {gr.name: gr.producers for gr in g.prunable},
                       "model": g.prune(model, {gid: np.arange(k) for gid, k in counts.items()}),
                       "project_s": time.perf_counter() - t0, "table_s": t_table}
        print(f"{name}: {archs[name]['flops']:.3f}x FLOPs, channels "
              f"{[c[0] for c in archs[name]['channels'].values()]}", flush=True)
    if a.latency_target:
        lr = make("l1")
        g = lr.graph(model)
        t0 = time.perf_counter()
        p = lr.project(model, {f"ratio/{gr.name}": 1.0 for gr in g.prunable}, "latency", a.latency_target)
        counts = lr._counts(g, p)
        archs["latency-target"] = {
            "keys": {"target": f"latency {a.latency_target:g}x"}, "params": p,
            "flops": lr.predict_ratio(model, p, "flops"), "predicted_latency": lr.predict_ratio(model, p, "latency"),
            "channels": {gr.name: [counts[gr.id], gr.size] for gr in g.prunable},
            "groups": {gr.name: gr.producers for gr in g.prunable},
            "model": g.prune(model, {gid: np.arange(k) for gid, k in counts.items()}),
            "project_s": time.perf_counter() - t0}
        lt = archs["latency-target"]
        print(f"latency-target: predicted {lt['predicted_latency']:.2f}x, {lt['flops']:.3f}x FLOPs "
              f"in {lt['project_s']:.0f}s", flush=True)

    # -- accuracy: every criterion on the default architecture ----------------------------------------
    rows = []
    default = archs[DEFAULT]
    for crit in a.criteria:
        lr = make(crit, **default["keys"])
        t0 = time.perf_counter()
        comp = lr.compress(model, default["params"], ft_data, Budget(epochs=0))
        t_select = time.perf_counter() - t0
        acc0 = M.accuracy(comp.deploy, data.x_test, data.y_test)
        print(f"{crit}: pruned in {t_select:.1f}s, accuracy before fine-tuning {acc0:.4f}", flush=True)
        keras.utils.set_random_seed(0)
        t0 = time.perf_counter()
        lr.fine_tune(comp.deploy, ft_data, Budget(epochs=a.epochs), teacher=model)
        t_ft = time.perf_counter() - t0
        acc1 = M.accuracy(comp.deploy, data.x_test, data.y_test)
        tfl = to_tflite(comp.deploy)
        acc_tfl = M.tflite_accuracy(tfl, data.x_test, data.y_test)
        print(f"{crit}: accuracy after fine-tuning {acc1:.4f} (TFLite {acc_tfl:.4f}, {t_ft:.0f}s)", flush=True)
        assert comp.info["channels"] == default["channels"]
        rows.append({"criterion": crit, "flops": lr.measure(model, comp, "flops"), "before": acc0, "after": acc1,
                     "tflite_after": acc_tfl, "select_s": t_select, "fine_tune_s": t_ft})

    # -- latency ---------------------------------------------------------------------------------------
    sweep = _conv_sweep(a.rounds, short=a.quick)
    blobs = {"original": to_tflite(model), **{k: to_tflite(v["model"]) for k, v in archs.items()}}
    ops = {k: _ops(b) for k, b in blobs.items()}
    load_lat = load_avg()
    lat, lat_med = _latencies(blobs, shape, a.rounds)
    wall = time.perf_counter() - t_start
    res = {"command": _command(), "date": dt.datetime.now().isoformat(timespec="seconds"),
           "machine": f"{cpu_name()} ({_flags()}), {os.cpu_count()} cores, {platform.platform()}",
           "load_average": {"start": load_before, "latency": load_lat, "end": load_avg()}, "wall_s": wall,
           "model": str(a.model), "base_accuracy": base_acc, "base_macs": M.count_macs(model),
           "base_params": M.count_params(model), "args": {k: v for k, v in vars(a).items()},
           "accuracy": rows, "conv_sweep": sweep, "test_images": len(data.x_test), "tflite_ops": ops,
           "archs": {k: {kk: vv for kk, vv in v.items() if kk != "model"} | {"macs": M.count_macs(v["model"]),
                                                                          "params_count": M.count_params(v["model"])}
                     for k, v in archs.items()},
           "latency_ms": {k: {f"b{b}_t{t}": ms for (b, t), ms in v.items()} for k, v in lat.items()},
           "latency_ms_median": {k: {f"b{b}_t{t}": ms for (b, t), ms in v.items()} for k, v in lat_med.items()}}
    out = ROOT / "docs" / "benchmarks"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.name}.json").write_text(json.dumps(res, indent=2, default=float))
    _plot(res, out / f"{a.name}.png")
    page = _report(a, res)
    (out / f"{a.name}.md").write_text(page)
    print(page)
    print(f"wrote {out / (a.name + '.md')}")
    return 0


def _command() -> str:
    return ("python scripts/benchmarks/channel_pruning.py " + " ".join(sys.argv[1:])).strip()


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    sw = [r for r in res["conv_sweep"] if r["vary"] == "out"]
    ax1.plot([r["cout"] for r in sw], [r["ms"] for r in sw], "o-", label="output channels (32 in)")
    si = [r for r in res["conv_sweep"] if r["vary"] == "in"]
    ax1.plot([r["cin"] for r in si], [r["ms"] for r in si], "s--", label="input channels (32 out)")
    ax1.set_xlabel("channels")
    ax1.set_ylabel("ms per invoke (batch 32, 1 thread)")
    ax1.set_title("one 3x3 conv, 14x14, TFLite XNNPACK")
    ax1.legend()
    ax1.grid(alpha=0.3)
    keys = list(res["latency_ms"]["original"])
    names = [k for k in res["latency_ms"] if k != "original"]
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        sp = [res["latency_ms"]["original"][k] / res["latency_ms"][n][k] for k in keys]
        ax2.bar([j + i * w for j in range(len(keys))], sp, w, label=f"{n} ({res['archs'][n]['flops']:.2f}x FLOPs)")
    ax2.axhline(0.8 * res["args"]["target"], color="k", ls=":", label="0.8 x FLOPs target")
    ax2.set_xticks([j + 0.4 - w / 2 for j in range(len(keys))], [k.replace("_", " ") for k in keys])
    ax2.set_ylabel("TFLite latency speedup")
    ax2.set_title("ResNet-20 pruned, speedup over the original")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report(a, res: dict) -> str:
    base = res["base_accuracy"]
    n_ft = min(a.subset, 60000)
    arch_names = list(res["archs"])
    out = [
        f"# Channel pruning: ResNet-20 on Fashion-MNIST, {a.target:g}x fewer FLOPs"
        + (" (quick smoke run)" if a.quick else ""),
        "",
        f"- command: `{res['command']}`",
        f"- date: {res['date']}",
        f"- machine: {res['machine']}; shared with other jobs (load average 1/5/15 min: "
        f"{res['load_average']['start']} at start, {res['load_average']['latency']} before the latency "
        f"rounds, {res['load_average']['end']} at end)",
        f"- wall time: {res['wall_s'] / 60:.1f} min",
        f"- model: `{Path(a.model).name}` ({res['base_params']:,} params, {res['base_macs']:,} MACs), "
        f"test accuracy {base:.4f} on {'the' if res['test_images'] == 10000 else 'a seeded subset of'} "
        f"{res['test_images']:,} test images",
        f"- fine-tuning: {a.epochs:g} epochs on {'all' if n_ft == 60000 else 'a seeded subset of'} {n_ft:,} "
        f"training images, SGD (Nesterov momentum 0.9), cosine learning rate from {a.lr:g}, batch 128, random "
        "2-pixel shift + flip (as the original was trained), L2 1e-4 on convs (kept from the model), "
        + ("distillation from the original (T=4, weight 0.5)" if a.distill else "no distillation"),
        f"- calibration for reconstruction / discrimination: {a.calibration} training images (never test)",
        "",
        f"![latency]({a.name}.png)",
        "",
        f"## Accuracy ({res['test_images']:,} test images), architecture `{DEFAULT}`",
        "",
        "| criterion | FLOPs ratio | before fine-tuning | after fine-tuning | vs original | TFLite after "
        "| selection time | fine-tuning time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["accuracy"]:
        out.append(f"| {r['criterion']} | {r['flops']:.3f}x | {r['before']:.4f} | {r['after']:.4f} | "
                   f"{100 * (r['after'] - base):+.2f} pt | {r['tflite_after']:.4f} | {r['select_s']:.0f} s | "
                   f"{r['fine_tune_s'] / 60:.1f} min |")
    out += ["", "## Architectures: channels kept per group", "",
            "Every architecture is `learner.project` of uniform preserve ratios onto the target; the "
            "criterion only decides which channels stay, not how many.", ""]
    for n in arch_names:
        ar = res["archs"][n]
        desc = ARCHS[n][1] if n in ARCHS else (f"`target.metric: latency`, ratio {a.latency_target:g} "
                                               f"(predicted {ar.get('predicted_latency', 0):.2f}x at batch 1, "
                                               "1 thread), "
                                               "learner defaults")
        table = f" (latency table {ar['table_s']:.1f} s before that)" if ar.get("table_s") else ""
        out.append(f"- `{n}`: {desc}; {ar['flops']:.3f}x FLOPs, {ar['params_count']:,} params, "
                   f"projected in {ar['project_s']:.1f} s{table}")
    out += ["", "| group (first producer) | producers | " + " | ".join(arch_names) + " |",
            "|---|---|" + "---|" * len(arch_names)]
    first = res["archs"][arch_names[0]]
    for g in first["channels"]:
        cells = [f"{k} / {n} ({k / n:.2f})" for k, n in (res["archs"][s]["channels"][g] for s in arch_names)]
        out.append(f"| {g} | {', '.join(first['groups'][g])} | " + " | ".join(cells) + " |")
    same = [n for n in arch_names if res["tflite_ops"][n] == res["tflite_ops"]["original"]]
    orig_ops = ", ".join(f"{k} x{v}" for k, v in res["tflite_ops"]["original"].items())
    out += ["", f"TFLite graph after surgery: {len(same)} of {len(arch_names)} architectures have exactly the "
            f"original's ops ({orig_ops})" + ("" if len(same) == len(arch_names) else "; differ: " + ", ".join(
                f"`{n}` {res['tflite_ops'][n]}" for n in arch_names if n not in same)) + "."]
    out += ["", "## TFLite latency (float32, XNNPACK)", "",
            f"ms per invoke, {a.rounds} interleaved rounds (all models take turns in each round; per round 50 "
            "invokes at batch 1, 8 at batch 32). `fastest`: the fastest invoke (other jobs can only slow an "
            "invoke down, so this is the model's own cost); `median`: the best round's median (what this "
            "busy machine gives). Speedups from `fastest`, with the `median` speedup beside.", "",
            "| architecture | FLOPs speedup | batch | threads | original ms (fastest / median) | pruned ms "
            "(fastest / median) | latency speedup | latency / FLOPs speedup | median speedup |",
            "|---|---|---|---|---|---|---|---|---|"]
    lat, med = res["latency_ms"], res["latency_ms_median"]
    for n in arch_names:
        fs = res["archs"][n]["flops"]
        for key in lat["original"]:
            b, t = key[1:].split("_t")
            sp = lat["original"][key] / lat[n][key]
            out.append(f"| {n} | {fs:.3f}x | {b} | {t} | {lat['original'][key]:.3f} / {med['original'][key]:.3f} "
                       f"| {lat[n][key]:.3f} / {med[n][key]:.3f} | {sp:.2f}x | {sp / fs:.2f} "
                       f"| {med['original'][key] / med[n][key]:.2f}x |")
    out += ["", "## Why: one conv's latency against its channel counts", "",
            "A single 3x3 `same` conv + ReLU on 14x14 inputs, batch 32, 1 thread, TFLite XNNPACK; the "
            f"fastest of 8 invokes in each of {max(3, a.rounds)} rounds (the quietest moment of a shared machine).", "",
            "| varied | in | out | ms | ns per 1000 MACs |", "|---|---|---|---|---|"]
    for r in res["conv_sweep"]:
        out.append(f"| {r['vary']} | {r['cin']} | {r['cout']} | {r['ms']:.3f} | {r['ns_per_kmac']:.1f} |")
    out += ["", f"Goals: reconstruction within 1.0 pt of {base:.4f} after fine-tuning; latency speedup "
            f">= 0.8x the FLOPs speedup (>= {0.8 * a.target:.2f}x at {a.target:g}x)."]
    fs = res["archs"][DEFAULT]["flops"]
    ratios = {k: lat["original"][k] / lat[DEFAULT][k] / fs for k in lat["original"]}
    miss = [f"{k} ({v:.2f})" for k, v in ratios.items() if v < 0.8]
    rec = [r for r in res["accuracy"] if r["criterion"] == "reconstruction"]
    out += ["", f"Measured here for `{DEFAULT}` ({fs:.3f}x FLOPs): latency / FLOPs speedup "
            + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
            + (f" (below 0.8: {', '.join(miss)})" if miss else " (all >= 0.8)")
            + (f"; reconstruction {100 * (rec[0]['after'] - base):+.2f} pt after fine-tuning" if rec else "")
            + ".", ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
