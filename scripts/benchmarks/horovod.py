#!/usr/bin/env python
"""Training throughput of one process vs `horovodrun -np 2` at the same global batch.

    python scripts/benchmarks/horovod.py            # seed CNN and ResNet-20, writes docs/benchmarks/horovod.md
    python scripts/benchmarks/horovod.py --quick    # fewer steps (smoke test)

Each measurement is a fresh process (or horovodrun job) running the real `Trainer` on the
small Fashion-MNIST sample; a hook timestamps steps after a warm-up (tracing, first
allreduce), so images/s is steady-state training and excludes start-up, which the wall time
column includes. Under horovodrun each rank gets cores / local ranks intra-op threads
(pocketflow.distributed._pin_devices); the single process keeps TensorFlow's default.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# this file is named horovod.py: drop its folder from sys.path, or `import horovod` finds it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT / "tests" / "data" / "fashion_mnist_small.npz"
OUT = ROOT / "docs" / "benchmarks" / "horovod.md"
CASES = {  # model -> (global batch, warm-up steps, timed steps, timed steps with --quick)
    "seed_cnn": (128, 5, 150, 30),
    "resnet20": (128, 3, 30, 8),
}
QUICK_CASES = ("seed_cnn",)  # the smoke run: one model, 1 and 2 processes
MARK = "HOROVOD_BENCH "


def worker(model_name: str, batch: int, warmup: int, timed: int) -> None:
    from pocketflow.distributed import world
    w = world()  # before any TensorFlow op: pins the threads per rank
    import keras
    import tensorflow as tf

    from pocketflow.data import load_dataset
    from pocketflow.training import TrainHook, Trainer
    from pocketflow.zoo import build_model

    class Clock(TrainHook):
        def __init__(self):
            self.t = {}

        def after_step(self, step):
            if step in (warmup, warmup + timed):
                self.t[step] = time.perf_counter()

    keras.utils.set_random_seed(0)
    data = load_dataset({"name": "npz", "path": str(NPZ), "val_split": 0.0})
    model = build_model(model_name, data.input_shape, data.num_classes)
    clock = Clock()
    cfg = {"epochs": 1, "batch_size": batch, "optimizer": "sgd", "learning_rate": 0.01, "momentum": 0.9,
           "schedule": "constant", "scale_lr": False, "verbose": False}
    Trainer(model, data, cfg, hooks=[clock], seed=0).fit(steps=warmup + timed)
    if w.is_root:
        secs = clock.t[warmup + timed] - clock.t[warmup]
        print(MARK + json.dumps({"images_per_s": timed * batch / secs, "step_ms": 1e3 * secs / timed,
                                 "intra_threads": tf.config.threading.get_intra_op_parallelism_threads()}),
              flush=True)


def measure(model_name: str, procs: int, quick: bool) -> dict:
    batch, warmup, timed, timed_quick = CASES[model_name]
    cmd = [sys.executable, __file__, "--worker", model_name, str(batch), str(warmup),
           str(timed_quick if quick else timed)]
    if procs > 1:
        cmd = [shutil.which("horovodrun", path=str(Path(sys.executable).parent)) or "horovodrun",
               "-np", str(procs), "-H", f"localhost:{procs}", "--gloo", *cmd]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    wall = time.perf_counter() - t0
    lines = [ln.split(MARK, 1)[1] for ln in res.stdout.splitlines() if MARK in ln]
    if res.returncode or not lines:
        sys.exit(f"{model_name} x{procs} failed (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return {"model": model_name, "procs": procs, "batch": batch, "wall_s": wall, **json.loads(lines[-1])}


def machine() -> str:
    from importlib.metadata import version
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}, Python "
            f"{platform.python_version()}, TensorFlow {version('tensorflow')}, Horovod {version('horovod')} (Gloo)")


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer timed steps, one round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of all measurements (median reported)")
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "BATCH", "WARMUP", "TIMED"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker[0], *map(int, a.worker[1:]))
        return 0
    cases = QUICK_CASES if a.quick else tuple(CASES)
    out = OUT.with_name("horovod_quick.md") if a.quick else OUT
    if a.quick:
        a.repeats = 1
    started, load_before, t0 = dt.datetime.now(), load_average(), time.perf_counter()
    runs: dict = {}  # (model, procs) -> measurements; rounds interleave the setups so load hits all
    for _ in range(a.repeats):
        for name in cases:
            for procs in (1, 2):
                r = measure(name, procs, a.quick)
                runs.setdefault((name, procs), []).append(r)
                print(f"{name} x{procs}: {r['images_per_s']:.0f} images/s ({r['wall_s']:.0f}s wall)", flush=True)
    wall, load_after = time.perf_counter() - t0, load_average()

    def median(key, rs):
        return statistics.median(r[key] for r in rs)

    base = {name: median("images_per_s", runs[name, 1]) for name in cases}
    table = "\n".join(
        f"| {name} | {rs[0]['batch']} | {'python' if procs == 1 else 'horovodrun -np 2'} | "
        f"{rs[0]['intra_threads'] or 'TF default'} | {median('images_per_s', rs):.0f} "
        f"({min(r['images_per_s'] for r in rs):.0f}-{max(r['images_per_s'] for r in rs):.0f}) | "
        f"{median('step_ms', rs):.1f} | {median('images_per_s', rs) / base[name]:.2f}x | "
        f"{median('wall_s', rs):.0f} s |" for (name, procs), rs in runs.items())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"""# Horovod: 1 process vs `horovodrun -np 2` (CPU)

Command: `python scripts/benchmarks/horovod.py{' --quick' if a.quick else f' --repeats {a.repeats}'}`
Date: {started:%Y-%m-%d %H:%M} · total wall time {wall / 60:.1f} min
Machine: {machine()}
Load average (1, 5, 15 min) before: {load_before}; after: {load_after} (a shared machine: other jobs ran too)

Steady-state training throughput of the real `Trainer` (SGD, small Fashion-MNIST sample,
28x28x1) at the same **global** batch after a few warm-up steps; median of {a.repeats} interleaved
round(s). Under horovodrun each rank trains on half of every batch and gradients are averaged
with a Gloo allreduce. Wall time is the whole process or job: start-up (TensorFlow import,
Horovod rendezvous) and tracing included.

| model | global batch | launched as | intra-op threads per process | images/s, median (min-max) | ms/step | vs 1 process | wall |
| --- | --- | --- | --- | --- | --- | --- | --- |
{table}

Caveat: this machine has {os.cpu_count()} CPU cores and no GPU. Two ranks split the same cores
that one process already uses (one intra-op thread each), so the best case here is parity,
minus the allreduce, which runs over loopback TCP; the numbers say what the data-parallel path
costs, not how it scales. With one GPU per rank each rank brings its own accelerator and the
same code scales with the number of GPUs (see docs/horovod.md), which 2 CPU cores cannot show.
""")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
