"""Benchmark: does a cheap ranking stage (search.rank) rank candidates as the trial fine-tune does?

    python scripts/benchmarks/fidelity.py            # ~15 min on 2 shared cores; docs/benchmarks/fidelity.md
    python scripts/benchmarks/fidelity.py --quick    # <1 min on tests/data's sample; fidelity_quick.md

For each case, N points are sampled uniformly from the learner's search space and projected onto
the target (as the search does), then each projected point is scored four ways
(pocketflow.hpo.fidelity.score): zero_shot (no fine-tune, BatchNorm re-estimated), zero_shot
without the re-estimation (where the deploy model has BN), short (a `--fraction` of the trial's
fine-tune) and the trial itself (the search's `trial_epochs` fine-tune, validation accuracy: what
the search ranks by). Reported: the Spearman rank correlation of each cheap score with the trial
score, its seconds, and whether keeping the top half by the cheap score keeps the best trial.

Cases: `sparsity_int8`, the seed CNN on MNIST with chain [weight_sparsity, uniform_quant] at 8 bits
and a high packed_size target; `channels`, the pretrained VGG-small (BN after every conv) on
Fashion-MNIST with channel_pruning at 2x FLOPs (the seed CNN has one prunable conv: a FLOPs
target pins its only dimension, so every projected point would be the same).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, learner_section, md_table, write_page  # noqa: E402

VGG = ROOT.parent / "shared" / "models" / "vgg_small_fashion_mnist.keras"
SAMPLE = ROOT / "tests" / "data" / "fashion_mnist_small.npz"


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tests/data sample, 4 points, a few steps: fidelity_quick")
    p.add_argument("--points", type=int, default=None, help="projected points per case (default 16; --quick 4)")
    p.add_argument("--fraction", type=float, default=0.1, help="the short stage's share of the trial fine-tune")
    p.add_argument("--images", type=int, default=2000, help="validation images the cheap stages score on")
    p.add_argument("--cases", nargs="+", default=["sparsity_int8", "channels"])
    a = p.parse_args()
    a.points = a.points or (3 if a.quick else 16)
    a.images = 300 if a.quick else a.images
    return a


def cases(a) -> dict:
    """name -> (data config, model, learner section, search fix, metric, target ratio, trial budget)."""
    ft = {"batch_size": 128, "optimizer": "adam", "schedule": "cosine", "verbose": False}
    mnist = {"name": "npz", "path": str(SAMPLE), "val_split": 0.1} if a.quick else {"name": "mnist", "val_split": 0.1}
    fashion = ({"name": "npz", "path": str(SAMPLE), "val_split": 0.1} if a.quick else
               {"name": "fashion_mnist", "val_split": 0.2, "limit_train": 10000})
    trial = {"steps": 5} if a.quick else {"epochs": 1.0}
    return {
        "sparsity_int8": (mnist, "seed_cnn", {"name": "chain", "steps": ["weight_sparsity", "uniform_quant"],
                                              "fine_tune": {**ft, "learning_rate": 1e-3}},
                          {"uniform_quant/bits/conv": 8, "uniform_quant/bits/logits": 8}, "packed_size",
                          12.0, trial),
        "channels": (fashion, str(VGG), {"name": "channel_pruning", "latency_aware": False,
                                         "fine_tune": {**ft, "learning_rate": 3e-4}},
                     {}, "flops", 2.0, trial),
    }


def model_for(name: str, data):
    import keras

    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model, load_keras_file
    if name.endswith(".keras"):
        return load_keras_file(name)
    keras.utils.set_random_seed(0)
    m = build_model(name, data.input_shape, data.num_classes)
    Trainer(m, data, {"epochs": 2, "batch_size": 128, "optimizer": "adam", "learning_rate": 2e-3,
                      "schedule": "constant", "verbose": False}).fit()
    return m


def sample(space: dict, rng) -> dict:
    from pocketflow.hpo.space import Categorical, Float
    out = {}
    for k, d in space.items():
        if isinstance(d, Categorical):
            out[k] = d.choices[rng.integers(len(d.choices))]
        elif isinstance(d, Float):
            out[k] = float(np.exp(rng.uniform(np.log(d.low), np.log(d.high))) if d.log else rng.uniform(d.low, d.high))
        else:
            out[k] = int(rng.integers(d.low, d.high + 1))
    return out


def run_case(a, name: str) -> dict:
    import keras

    from pocketflow import metrics as M
    from pocketflow.data import load_dataset
    from pocketflow.hpo.fidelity import BN_IMAGES, batchnorms, reestimate_bn, score
    from pocketflow.hpo.space import build_space
    from pocketflow.learners import LEARNERS, Budget
    data_cfg, model_name, section, fix, metric, ratio, trial = cases(a)[name]
    data = load_dataset(data_cfg)
    model = model_for(model_name, data)
    learner = LEARNERS.get(section["name"])(learner_section(**section), seed=0)
    space, fixed = build_space(learner, model, {"fix": fix})
    rng, rows = np.random.default_rng(0), []
    n_val = min(a.images, len(data.x_val))
    frac = Budget(epochs=trial["epochs"] * a.fraction) if "epochs" in trial else \
        Budget(steps=max(1, round(trial["steps"] * a.fraction)))
    for i in range(a.points):
        params = learner.project(model, {**sample(space, rng), **fixed}, metric, ratio)
        row = {"point": i}
        has_bn = True
        for stage, budget, bn in (("zero_shot", Budget(epochs=0), True), ("zero_shot_no_bn", Budget(epochs=0), False),
                                  ("short", frac, True)):
            if stage == "zero_shot_no_bn" and not has_bn:  # nothing to re-estimate: the same score
                continue
            keras.utils.set_random_seed(i)
            r = score(learner, model, params, data, budget, n_val, bn=bn)
            row[stage], row[f"{stage}_s"] = r["val_acc"], r["seconds"]
            if stage == "zero_shot":
                has_bn = r["bn_layers"] > 0
        keras.utils.set_random_seed(i)
        t0 = time.perf_counter()
        comp = learner.compress(model, params, data, Budget(**trial))
        row["trial"] = M.accuracy(comp.deploy, data.x_val, data.y_val)
        row["trial_s"] = time.perf_counter() - t0
        if has_bn:  # the trial's model with its BN statistics re-estimated too (a few steps barely move them)
            reestimate_bn(comp.deploy, data.representative(BN_IMAGES))
            row["trial_bn"] = M.accuracy(comp.deploy, data.x_val, data.y_val)
        row["ratio"] = learner.measure(model, comp, metric)
        rows.append(row)
        print(f"{name} point {i}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "point"), flush=True)
    return {"rows": rows, "metric": metric, "ratio": ratio, "bn": bool(batchnorms(model)), "trial": trial,
            "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per cheap stage: Spearman with the trial score (and with the BN-re-estimated trial score where
    there is one), seconds, and what keeping the top half by it would have cost."""
    from scipy.stats import spearmanr
    trial = np.array([r["trial"] for r in rows])
    best = int(np.argmax(trial))
    out = []
    for stage in ("zero_shot", "zero_shot_no_bn", "short"):
        if stage not in rows[0]:
            continue
        s = np.array([r[stage] for r in rows])
        kept = s >= np.median(s)
        rho = lambda ref: float(spearmanr(s, ref).statistic) if np.ptp(s) and np.ptp(ref) else float("nan")  # noqa: E731
        out.append({"stage": stage, "spearman": rho(trial),
                    **({"spearman_bn": rho(np.array([r["trial_bn"] for r in rows]))} if "trial_bn" in rows[0] else {}),
                    "seconds": float(np.mean([r[f"{stage}_s"] for r in rows])),
                    "best_kept": bool(kept[best]), "regret": float(trial.max() - trial[kept].max())})
    out.append({"stage": "trial fine-tune", "spearman": 1.0, "seconds": float(np.mean([r["trial_s"] for r in rows])),
                "best_kept": True, "regret": 0.0})
    return out


def main() -> int:
    a = _args()
    started = time.time()
    results = {}
    for name in a.cases:
        if name == "channels" and not VGG.is_file():
            print(f"channels: {VGG} missing; skipped", file=sys.stderr)
            continue
        results[name] = run_case(a, name)
    body = ["Spearman rank correlation of each cheap score with the trial's score (validation accuracy "
            "after the search's trial fine-tune) over projected points; seconds per candidate; whether "
            "keeping the top half by the cheap score keeps the best trial, and the accuracy lost if not.\n"]
    for name, r in results.items():
        body.append(f"## {name}: {r['metric']} {r['ratio']:.2f}x, {len(r['rows'])} points, trial fine-tune "
                    f"{r['trial']}\n")
        body.append(md_table(r["summary"], [("stage", "stage", ""), ("spearman", "Spearman", ".3f"),
                                            *([("spearman_bn", "Spearman vs trial + BN re-est.", ".3f")]
                                              if "trial_bn" in r["rows"][0] else []),
                                            ("seconds", "s / candidate", ".1f"), ("best_kept", "best kept", ""),
                                            ("regret", "regret (acc)", ".4f")]) + "\n")
        cols = [("point", "point", "")] + [(k, k, ".4f") for k in ("zero_shot", "zero_shot_no_bn", "short", "trial",
                                                                   "trial_bn")
                                           if k in r["rows"][0]] + [("ratio", r["metric"], ".2f")]
        body.append("<details><summary>per point</summary>\n\n" + md_table(r["rows"], cols) + "\n\n</details>\n")
    page = "fidelity_quick" if a.quick else "fidelity"
    write_page(page, "Ranking stage fidelity (search.rank)",
               f"python scripts/benchmark.py fidelity{' --quick' if a.quick else ''}", "\n".join(body), started,
               extra={"args": vars(a), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
