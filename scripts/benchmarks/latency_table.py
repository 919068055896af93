"""Wall time of channel pruning's latency table and latency-aware projection on keras.applications
models (docs/latency_table.md): first use (empty cache) and cached, each in a fresh process.

    python scripts/benchmarks/latency_table.py MobileNetV2:96 DenseNet121:64 ResNet50V2:64 [--cache DIR]

Prints one line per model and phase: seconds to analyse the graph, build (or load) the table,
project uniform ratios onto 2x FLOPs, and the table's entry count. Without --cache a fresh
temporary cache is used, so the first phase measures everything; the cached phase reruns the same
models in a new process on that cache.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def one(family: str, px: int) -> dict:
    import keras

    from pocketflow.config import load_config
    from pocketflow.learners import LEARNERS
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, family)(weights=None, input_shape=(px, px, 3), classes=10)
    cfg = load_config({"data": {"name": "fashion_mnist"}, "model": {"name": "seed_cnn"},
                       "learner": {"name": "channel_pruning"}})
    lr = LEARNERS.get("channel_pruning")(cfg["learner"], seed=0)
    t0 = time.perf_counter()
    g = lr.graph(model)
    t1 = time.perf_counter()
    table = lr.latency_table(model)
    t2 = time.perf_counter()
    p = lr.project(model, {f"ratio/{gr.name}": 1.0 for gr in g.prunable}, "flops", 2.0)
    t3 = time.perf_counter()
    return {"model": f"{family}:{px}", "graph_s": t1 - t0, "table_s": t2 - t1, "project_s": t3 - t2,
            "entries": len(table._t), "ratio": lr.predict_ratio(model, p, "flops"),
            "cost": table.cost(lr._counts(g, p))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="Family:pixels, e.g. DenseNet121:64")
    ap.add_argument("--cache", default=None, help="cache directory (default: a fresh temporary one)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one model, one phase
    a = ap.parse_args(argv)
    if a.one:
        fam, px = a.models[0].split(":")
        print("RESULT " + json.dumps(one(fam, int(px))), flush=True)
        return 0
    cache = a.cache or tempfile.mkdtemp(prefix="pf_latency_")
    env = {**os.environ, "POCKETFLOW_CACHE": cache}
    for spec in a.models:
        for phase in ("first use", "cached"):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, spec, "--one"], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            res = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not res:
                print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
                return 1
            r = res[0]
            print(f"{spec:16s} {phase:9s}: graph {r['graph_s']:5.1f}s  table {r['table_s']:6.1f}s  "
                  f"projection {r['project_s']:6.1f}s  table+projection {r['table_s'] + r['project_s']:6.1f}s  "
                  f"process {wall:6.1f}s  entries {r['entries']}  ratio {r['ratio']:.3f}  cost {r['cost']:.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
