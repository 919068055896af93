"""seed-table: the TensorFlow blog's MNIST table, produced by PocketFlow's learners and by TFMOT
(tf_keras, its own process) in the same run, on the same data split.

    python scripts/benchmarks/seed_table.py [--quick] [--data ../shared/data/mnist.npz]

Sizes are gzip'd files (as the blog's 9.71x: 78 117 B -> 8 044 B); the reduction factor is
against the gzip'd float TFLite baseline of the same tool. Each number is the median of
--reps runs with different seeds, the spread (max - min) beside it.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DOCS, ROOT, dataset_npz, md_table, plot, run_learner, run_peer,  # noqa: E402
                    tflite_row, write_page)

PEER_PCQAT_FILE = "pruned_clustered_QAT_TFLite_PCQAT.tflite"  # tfmot_peer.py --save-dir names files by row
PIPELINES = [  # (row name, learner, learner config, TFLite quantization)
    ("pruned + TFLite", "weight_sparsity", "sparse", None),
    ("QAT + TFLite", "uniform_quant", "qat", "int8"),
    ("pruned + QAT + TFLite", "chain", "pqat", "int8"),
    ("pruned + clustered + QAT + TFLite", "chain", "pcqat", "int8"),
    ("more pruned + fewer clusters + QAT + TFLite", "chain", "goal", "int8"),
]


def dense_sparsity(overall: float, model) -> float:
    """The sparsity of the Dense kernel that, with the 108-weight conv kept dense, makes `overall`
    of all kernel weights zero (0.8 overall -> 0.8043 on the Dense)."""
    from pocketflow.learners.kernels import kernel_variable
    from pocketflow.learners.wrap import kernel_layers
    sizes = [int(np.prod(kernel_variable(layer).shape)) for _, layer, _ in kernel_layers(model)]
    return math.ceil(1e6 * math.ceil(overall * sum(sizes)) / sum(sizes[1:])) / 1e6


def configs(a, model):
    """Our `learner:` sections. The blog rows use the TFMOT peer's sparsity, cluster count and
    epochs (prune 2, QAT 1, cluster 1, each on top of the previous step); ours keep the conv
    (108 weights) dense and prune the Dense a little more so that the same fraction of all
    weights is zero, and distil from the baseline. Like TFMOT, the clustered row gives every
    layer (the conv too) 16 shared values; ours start them evenly spaced (`init: linear`). The
    goal row prunes and clusters harder with a longer fine-tuning."""
    distill = {"enabled": not a.no_distill, "temperature": 4.0, "weight": 0.5}
    ft = {"epochs": a.ft_epochs, "learning_rate": 1e-3, "schedule": "cosine"}
    one = {"epochs": 1, "learning_rate": 5e-4, "schedule": "cosine"}
    qat = {"epochs": 1, "learning_rate": 2.5e-4, "schedule": "cosine"}
    ws = {"sparsity": dense_sparsity(a.sparsity, model), "skip_first": True}
    goal_ws = {"sparsity": dense_sparsity(a.goal_sparsity, model), "skip_first": True}
    ge = a.goal_epochs
    return {
        "sparse": {**ws, "fine_tune": ft, "distill": distill},
        "qat": {"bits": 8, "fine_tune": qat, "distill": distill},
        "pqat": {"steps": ["weight_sparsity", "uniform_quant"], "fine_tune": ft, "distill": distill,
                 "weight_sparsity": ws, "uniform_quant": {"bits": 8, "fine_tune": qat}},
        "pcqat": {"steps": ["weight_sparsity", "nonuniform_quant", "uniform_quant"], "fine_tune": ft,
                  "distill": distill, "weight_sparsity": ws,
                  "nonuniform_quant": {"bits": a.cluster_bits, "init": a.cluster_init, "fine_tune": one},
                  "uniform_quant": {"bits": 8, "fine_tune": qat}},
        "goal": {"steps": ["weight_sparsity", "nonuniform_quant", "uniform_quant"],
                 "fine_tune": {**ft, "epochs": ge[0]}, "distill": distill, "weight_sparsity": goal_ws,
                 "nonuniform_quant": {"bits": a.goal_cluster_bits, "skip_first": True,
                                      "fine_tune": {**one, "epochs": ge[1]}},
                 "uniform_quant": {"bits": 8, "fine_tune": {**qat, "epochs": ge[2]}}},
    }


def lite_row(name, model, data, quant, weight_scales="auto") -> tuple[dict, bytes]:
    """`common.tflite_row`'s measures for a file written by `pocketflow.export.to_tflite` (int8 weight
    scales as `weight_scales` says; 'auto' = what the trained weights were quantized with)."""
    from pocketflow import metrics as M
    from pocketflow.export import choose_weight_scales, to_tflite
    blob = to_tflite(model, quant, data.representative() if quant == "int8" else None, weight_scales=weight_scales)
    shape = tuple(model.input_shape[1:])
    row = {"tool": "pocketflow", "name": name, "keras_accuracy": M.accuracy(model, data.x_test, data.y_test),
           "tflite_accuracy": M.tflite_accuracy(blob, data.x_test, data.y_test), "tflite_bytes": len(blob),
           "tflite_gzip_bytes": M.gzip_size(blob), "latency_ms_b1": M.tflite_latency(blob, shape, 1),
           "latency_ms_b32": M.tflite_latency(blob, shape, 32)}
    if quant == "int8":
        row["weight_scales"] = choose_weight_scales(model) if weight_scales == "auto" else weight_scales
    return row, blob


def ours(a, data, seed):
    import keras

    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(seed)
    base = build_model("seed_cnn", data.input_shape, 10)
    Trainer(base, data, {"epochs": a.epochs, "batch_size": 128, "optimizer": "adam", "learning_rate": 1e-3,
                         "schedule": "constant", "verbose": False}, seed=seed).fit()
    rows, blobs = [lite_row("baseline", base, data, None)[0]], {}
    cfgs = configs(a, base)
    for name, learner, key, quant in PIPELINES:
        cfg = dict(cfgs[key])
        epochs = cfg["fine_tune"]["epochs"]
        _, comp = run_learner(base, data, learner, epochs, seed=seed, **cfg)
        row, blobs[key] = lite_row(name, comp.deploy, data, quant)
        rows.append({**row, "exact_size_bytes": comp.size_bytes})
        if a.per_channel_rows and key == "pcqat":
            rows.append(lite_row(name + " [per-channel int8 scales]", comp.deploy, data, quant, "per_channel")[0])
    return rows, blobs["pcqat"]


def breakdown(blob: bytes) -> dict:
    """Where the bytes of a TFLite file go. Raw bytes of the int8 kernels, of every other buffer
    (biases, shapes), of the tensor names and of the metadata buffers; gzip'd: the whole file, the
    file with its kernels zeroed (what everything but the kernel values costs) and with its strings
    stripped (`flatbuffer_utils.strip_strings`: what the names cost). Per kernel: shape, distinct
    int8 scales (per-tensor Dense scales may be stored once per channel), distinct codes, nonzero codes."""
    from tensorflow.lite.tools import flatbuffer_utils as fu

    from pocketflow.metrics import gzip_size
    m = fu.read_model_from_bytearray(bytearray(blob))
    meta = {md.buffer for md in m.metadata or []}
    out = {"file": len(blob), "gzip": gzip_size(blob), "kernels": 0, "other_buffers": 0, "layers": {},
           "names": sum(len(t.name or b"") for sg in m.subgraphs for t in sg.tensors),
           "metadata": sum(len(m.buffers[b].data) for b in meta if m.buffers[b].data is not None)}
    for sg in m.subgraphs:
        for t in sg.tensors:
            data = m.buffers[t.buffer].data
            if data is None or not len(data) or t.buffer in meta:
                continue
            if fu.type_to_name(t.type) == "INT8" and len(t.shape) >= 2:
                codes = np.asarray(data, np.uint8).view(np.int8)
                out["kernels"] += codes.size
                q = t.quantization
                out["layers"]["x".join(map(str, t.shape))] = {
                    "scales": 0 if q is None or q.scale is None else len(np.unique(q.scale)),
                    "distinct": int(len(np.unique(codes))), "nonzero": int(np.count_nonzero(codes)), "n": int(codes.size)}
                m.buffers[t.buffer].data = np.zeros_like(np.asarray(data))
            else:
                out["other_buffers"] += len(data)
    out["structure"] = out["file"] - out["kernels"] - out["other_buffers"] - out["names"] - out["metadata"]
    out["gzip_kernels_zeroed"] = gzip_size(bytes(fu.convert_object_to_bytearray(m)))
    stripped = fu.read_model_from_bytearray(bytearray(blob))
    fu.strip_strings(stripped)
    out["gzip_strings_stripped"] = gzip_size(bytes(fu.convert_object_to_bytearray(stripped)))
    out["gzip_kernel_values"] = out["gzip"] - out["gzip_kernels_zeroed"]
    out["gzip_names"] = out["gzip"] - out["gzip_strings_stripped"]
    out["sparsity"] = 1 - sum(v["nonzero"] for v in out["layers"].values()) / max(1, out["kernels"])
    return out


def median_breakdown(bds: list[dict]) -> dict:
    keys = [k for k, v in bds[0].items() if isinstance(v, (int, float))]
    out = {k: float(np.median([b[k] for b in bds])) for k in keys}
    out["layers"] = {shape: {k: float(np.median([b["layers"][shape][k] for b in bds])) for k in v}
                     for shape, v in bds[0]["layers"].items()}
    return out


def breakdown_table(ours_bd: dict, peer_bd: dict) -> str:
    def layers(bd):
        return "; ".join(f"{s}: {v['nonzero']:,.0f}/{v['n']:,.0f} nonzero, {v['distinct']:.0f} codes, {v['scales']:.0f} "
                         f"scale{'s' if v['scales'] != 1 else ''}" for s, v in sorted(bd["layers"].items()))
    rows = [("gzip'd file", "gzip"), ("gzip'd, kernel values zeroed (all but the weights)", "gzip_kernels_zeroed"),
            ("→ kernel values (difference)", "gzip_kernel_values"),
            ("gzip'd, strings stripped", "gzip_strings_stripped"), ("→ tensor names (difference)", "gzip_names"),
            ("file", "file"), ("int8 kernels (raw)", "kernels"), ("other buffers: biases, shapes (raw)", "other_buffers"),
            ("tensor names (raw)", "names"), ("metadata buffers (raw)", "metadata"),
            ("flatbuffer structure: ops, tensors, quantization params, signature (raw)", "structure")]
    out = ["| bytes (median over seeds) | PocketFlow | TFMOT |", "|---|---|---|"]
    out += [f"| {label} | {ours_bd[k]:,.0f} | {peer_bd[k]:,.0f} |" for label, k in rows]
    out.append(f"| zero weights, all kernels | {ours_bd['sparsity']:.2%} | {peer_bd['sparsity']:.2%} |")
    out.append(f"| per kernel | {layers(ours_bd)} | {layers(peer_bd)} |")
    return "\n".join(out)


def median_rows(runs: list[list[dict]]) -> list[dict]:
    out = []
    for i, r0 in enumerate(runs[0]):
        row = {"tool": r0["tool"], "name": r0["name"], "weight_scales": r0.get("weight_scales")}
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
    ap.add_argument("--goal-sparsity", type=float, default=0.88, help="our extra row, aimed at the 15x goal")
    ap.add_argument("--goal-cluster-bits", type=int, default=3)
    ap.add_argument("--goal-epochs", type=lambda v: tuple(int(x) for x in v.split(",")), default=(8, 3, 3),
                    help="goal row: prune, cluster, QAT epochs")
    ap.add_argument("--cluster-init", default="linear", choices=("linear", "kmeans", "quantile"),
                    help="nonuniform_quant init of the clustered row")
    ap.add_argument("--no-distill", action="store_true", help="our rows without distillation")
    ap.add_argument("--no-per-channel-rows", dest="per_channel_rows", action="store_false",
                    help="skip the clustered row's extra conversion with per-channel int8 weight scales")
    a = ap.parse_args(argv)
    from pocketflow.data import load_dataset
    started = time.time()
    limit = 3000 if a.quick else None
    if a.quick:
        a.reps, a.epochs, a.ft_epochs, a.goal_epochs = 1, 1, 1, (1, 1, 1)
    data = load_dataset({"name": "npz", "path": a.data, "val_split": 0.1, "limit_train": limit})
    npz = dataset_npz(data, Path("/tmp") / f"seed_table_{Path(a.data).stem}{'_quick' if a.quick else ''}.npz")
    from pocketflow.zoo import build_model
    base_model = build_model("seed_cnn", data.input_shape, 10)
    ours_runs, peer_runs, ours_bd, peer_bd = [], [], [], []
    for seed in range(a.reps):
        rows, blob = ours(a, data, seed)
        ours_runs.append(rows)
        ours_bd.append(breakdown(blob))
        with tempfile.TemporaryDirectory() as d:
            peer = run_peer(npz, "--epochs", a.epochs, "--ft-epochs", a.ft_epochs, "--sparsity", a.sparsity,
                            "--clusters", 2 ** a.cluster_bits, "--seed", seed, "--save-dir", d)
            peer_bd.append(breakdown((Path(d) / PEER_PCQAT_FILE).read_bytes()))
        peer_runs.append([{**r, "tool": "TFMOT"} for r in peer["rows"]])
    rows = median_rows(ours_runs) + median_rows(peer_runs)
    cols = [("tool", "tool", ""), ("name", "pipeline", ""), ("tflite_accuracy", "TFLite accuracy", ".4f"),
            ("acc_delta_pt", "Δ acc (pt)", "+.2f"), ("tflite_gzip_bytes", "gzip'd TFLite (B)", ",.0f"),
            ("tflite_gzip_bytes_spread", "± (B)", ",.0f"), ("reduction", "reduction", ".2f"),
            ("tflite_bytes", "TFLite (B)", ",.0f"), ("weight_scales", "int8 weight scales", ""),
            ("latency_ms_b1", "latency b1 (ms)", ".3f"),
            ("latency_ms_b32", "latency b32 (ms)", ".3f")]
    best = max((r for r in rows if r["tool"] == "pocketflow" and "[per-channel" not in r["name"]), key=lambda r: r["reduction"]
               if r["acc_delta_pt"] >= -0.2 else 0)
    png = DOCS / ("seed_table" + ("_quick" if a.quick else "") + ".png")
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
    ge = a.goal_epochs
    dist = "no distillation" if a.no_distill else "distillation from the baseline (T = 4, weight 0.5)"
    ours_pc = next(r for r in rows if r["tool"] == "pocketflow" and r["name"] == "pruned + clustered + QAT + TFLite")
    peer_pc = next(r for r in rows if r["tool"] == "TFMOT" and "PCQAT" in r["name"])
    acc_ok = ours_pc["tflite_accuracy"] >= peer_pc["tflite_accuracy"]
    size_ok = ours_pc["tflite_gzip_bytes"] <= peer_pc["tflite_gzip_bytes"]
    pc_pc = next((r for r in rows if r["tool"] == "pocketflow" and "[per-channel" in r["name"]), None)
    obd, pbd = median_breakdown(ours_bd), median_breakdown(peer_bd)
    goal_rows = [r for r in rows if r["tool"] == "pocketflow" and r["reduction"] >= 15]
    body = (f"Seed CNN (Reshape → Conv2D 12@3×3 → MaxPool → Flatten → Dense 10) on {Path(a.data).name} "
            f"({len(data.x_train)} train / {len(data.x_val)} val / {len(data.x_test)} test). Each tool trains its "
            f"own baseline ({a.epochs} epochs, Adam 1e-3, batch 128) per seed; {a.reps} seed(s), median shown, "
            f"± = max − min of the gzip'd size. Sizes are gzip'd TFLite files; reduction = gzip'd float baseline "
            f"of the same tool / this.\n\n"
            f"**TFMOT rows** (the blog's recipe, unchanged): prune_low_magnitude {a.sparsity:.0%} "
            f"({a.ft_epochs} epochs, polynomial schedule to 80% of the steps), QAT 1 epoch, PQAT 1 epoch on the "
            f"pruned model, PCQAT = sparsity-preserving clustering ({2 ** a.cluster_bits} clusters, k-means++, "
            f"1 epoch) + cluster-preserving QAT (1 epoch); Adam 1e-3.\n\n"
            f"**PocketFlow rows** (learners through their `learner:` sections, chains for the combined rows): the "
            f"same sparsity ({a.sparsity:.0%} of all kernel weights), cluster count and epochs per step "
            f"(prune {a.ft_epochs}, cluster 1, QAT 1), but the 108-weight conv is kept dense (`skip_first`; the "
            f"Dense is pruned to {dense_sparsity(a.sparsity, base_model):.4f} so the total stays "
            f"{a.sparsity:.0%}), Adam with cosine decay, and {dist}. The clustered row gives every layer "
            f"{2 ** a.cluster_bits} shared values as TFMOT does (codebooks started `init: {a.cluster_init}`); its "
            f"8-bit QAT then uses one weight scale per tensor on the codebooks (`uniform_quant` "
            f"`weight_scales: auto`) and `pocketflow.export` converts with the scales the weights were trained "
            f"with (`weight_scales='auto'`, the table's int8 weight scales column), so the file holds exactly the "
            f"trained values. The last PocketFlow row aims at the goal: "
            f"{a.goal_sparsity:.0%} sparsity, {2 ** a.goal_cluster_bits} clusters, and a longer fine-tuning "
            f"(prune {ge[0]}, cluster {ge[1]}, QAT {ge[2]} epochs).\n\n"
            + md_table(rows, cols)
            + f"\n\n**Goal (issue 8)**: ≥ 15× smaller gzip'd than the gzip'd float baseline at accuracy ≥ "
            f"baseline − 0.2 pt. Best PocketFlow row within 0.2 pt (exported by `pocketflow.export`): **{best['name']}**, {best['reduction']:.2f}× "
            f"({best['acc_delta_pt']:+.2f} pt) — goal "
            + ("**met**" if best["reduction"] >= 15 and best["acc_delta_pt"] >= -0.2 else "**not met**")
            + (". Rows at ≥ 15×: " + "; ".join(f"{r['name']} {r['reduction']:.2f}× at {r['acc_delta_pt']:+.2f} pt"
                                                for r in goal_rows) if goal_rows else "")
            + f".\n\n**Prune → cluster → int8, ours vs TFMOT PCQAT (issue 5)**: ours {ours_pc['tflite_accuracy']:.4f} "
            f"at {ours_pc['tflite_gzip_bytes']:,.0f} B, TFMOT {peer_pc['tflite_accuracy']:.4f} at "
            f"{peer_pc['tflite_gzip_bytes']:,.0f} B: ours is "
            + ("at least as accurate" if acc_ok else "**less accurate**") + " and "
            + ("at least as small" if size_ok else "**larger**")
            + (f". The same trained models converted with per-channel int8 weight scales (the converter's default, "
               f"`[per-channel int8 scales]` row): {pc_pc['tflite_accuracy']:.4f} at {pc_pc['tflite_gzip_bytes']:,.0f} B"
               if pc_pc else "")
            + ".\n\n**Where the bytes go** (the two files above, `breakdown` in the script; the gzip'd lines are "
            "whole files with a part zeroed or stripped, so the differences are what that part costs after gzip). "
            "Both files hold the same ops; TFMOT prunes and clusters the conv too, ours keeps the conv's 108 "
            "weights and prunes the Dense slightly more, for at least the same fraction of zero weights:\n\n"
            + breakdown_table(obd, pbd)
            + f"\n\n![accuracy vs reduction]({png.name})\n")
    cmd = "python scripts/benchmark.py seed-table" + (" --quick" if a.quick else "")
    write_page("seed_table" + ("_quick" if a.quick else ""), "seed-table: TF blog MNIST table, PocketFlow vs TFMOT",
               cmd, body, started, {"rows": rows, "settings": vars(a),
                                    "breakdown": {"pocketflow": ours_bd, "TFMOT": peer_bd}})


if __name__ == "__main__":
    main()
