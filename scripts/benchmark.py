#!/usr/bin/env python
"""Run a named benchmark suite (or all) and log the run in docs/benchmarks.md.

    python scripts/benchmark.py seed-table            # one suite
    python scripts/benchmark.py all --quick           # the <=10 min smoke version of every suite

Each suite is a script in scripts/benchmarks/ that writes its own Markdown page (and PNGs) under
docs/benchmarks/; this driver runs it in a fresh process, then appends the command, date, machine
and wall time to the run log at the end of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = {  # name -> (script, what it measures)
    "seed-table": ("seed_table.py", "TF blog MNIST table: ours vs TFMOT (prune, QAT, PQAT, PCQAT)"),
    "sparsity-size": ("sparsity_size.py", "Fashion-MNIST CNN at 50/75/90/95% sparsity, ± int8, vs TFMOT"),
    "learners": ("learners.py", "VGG-small sparsity/8-bit/4-bit and MNIST sparsity + int8; step-time overhead"),
    "channel-pruning": ("channel_pruning.py", "ResNet-20 2x FLOPs: three criteria, latency vs FLOPs speed-up"),
    "search": ("search.py", "GP vs TPE vs random vs uniform at 2x FLOPs; search overhead"),
    "bits": ("bits.py", "uniform 8/4/2-bit, non-uniform 4/2-bit, fixed vs searched per-layer bits"),
    "horovod": ("horovod.py", "throughput: 1 process vs horovodrun -np 2"),
    "auto": ("auto.py", "learner: auto on the shipped configs (pocketflow run) vs the best hand recipes"),
    "sparse-encoding": ("sparse_encoding.py", "TFLite sparse tensor encoding: raw/gzip bytes, runs?, diffs, latency"),
    "fidelity": ("fidelity.py", "search.rank: zero-shot / short-fine-tune scores vs the trial fine-tune (Spearman, s)"),
}


def machine() -> str:
    try:
        import tensorflow as tf
        tfv = tf.__version__
    except Exception:  # pragma: no cover
        tfv = "?"
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, TF {tfv}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", choices=[*SUITES, "all"])
    ap.add_argument("--quick", action="store_true", help="smoke version (small data, few steps)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="passed on to the suite script")
    a = ap.parse_args(argv)
    if "--quick" in a.rest:  # `all --quick`: REMAINDER swallows flags after the suite name
        a.quick = True
        a.rest = [r for r in a.rest if r != "--quick"]
    names = list(SUITES) if a.suite == "all" else [a.suite]
    failed = []
    for name in names:
        script, _ = SUITES[name]
        path = ROOT / "scripts" / "benchmarks" / script
        if not path.exists():
            print(f"[benchmark] {name}: {path} missing", file=sys.stderr)
            failed.append(name)
            continue
        cmd = [sys.executable, str(path), *(["--quick"] if a.quick else []), *a.rest]
        print(f"[benchmark] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=ROOT)
        wall = time.time() - t0
        if rc:
            failed.append(name)
        shown = f"python scripts/benchmark.py {name}{' --quick' if a.quick else ''}"
        line = (f"| {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} | `{shown}` | {machine()} | "
                f"{wall / 60:.1f} min | {'ok' if rc == 0 else f'exit {rc}'} |\n")
        log = ROOT / "docs" / "benchmarks.md"
        if log.exists() and not a.quick:
            with open(log, "a") as f:
                f.write(line)
    if failed:
        print(f"[benchmark] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
