#!/usr/bin/env python3
"""Compare two benchmark result sets (the JSON beside each page): sizes and ratios must match,
accuracies may move within noise. For refactorings that promise unchanged behaviour.

    python scripts/benchmarks/compare.py OLD_DIR NEW_DIR [--pattern '*_quick.json'] [--acc-tol 0.02]

OLD_DIR may be a git revision (`git:REV`): its docs/benchmarks pages are read from the repository.
Exit 1 when a size or ratio differs (relative 1e-6) or an accuracy moves more than --acc-tol.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXACT = ("bytes", "ratio", "macs", "params")   # key fragments whose values must be equal
NOISY = ("acc", "test", "val")                 # key fragments of accuracies (moved by thread timing)
SKIP = ("seconds", "minutes", "ms", "wall", "time", "speed", "latency", "overhead", "spread", "load",
        "step", "cpu", "images", "commit", "date", "host", "path")


def _load(where: str, pattern: str) -> dict[str, dict]:
    if where.startswith("git:"):
        rev = where[4:]
        names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:docs/benchmarks"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
        return {n: json.loads(subprocess.run(["git", "show", f"{rev}:docs/benchmarks/{n}"], cwd=ROOT,
                                             capture_output=True, text=True, check=True).stdout)
                for n in names if fnmatch.fnmatch(n, pattern)}
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(where).glob(pattern))}


def _leaves(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}/{i}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)


def _kind(path: str) -> str | None:
    last = path.rsplit("/", 1)[-1].lower()
    if any(s in last for s in SKIP) or "/args/" in path:
        return None
    if any(s in last for s in EXACT):
        return "exact"
    if any(s in last for s in NOISY):
        return "noisy"
    return None


def compare(old: dict, new: dict, acc_tol: float) -> tuple[list[str], int]:
    bad, checked = [], 0
    for page in sorted(set(old) & set(new)):
        a, b = dict(_leaves(old[page])), dict(_leaves(new[page]))
        for path in sorted(set(a) & set(b)):
            kind = _kind(path)
            if kind is None:
                continue
            checked += 1
            x, y = a[path], b[path]
            if kind == "exact" and abs(x - y) > 1e-6 * max(1.0, abs(x)):
                bad.append(f"{page}{path}: {x:g} -> {y:g}")
            elif kind == "noisy" and abs(x - y) > acc_tol:
                bad.append(f"{page}{path}: {x:.4f} -> {y:.4f} (accuracy, tolerance {acc_tol})")
    return bad, checked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--pattern", default="*_quick.json")
    ap.add_argument("--acc-tol", type=float, default=0.02)
    a = ap.parse_args()
    old, new = _load(a.old, a.pattern), _load(a.new, a.pattern)
    bad, checked = compare(old, new, a.acc_tol)
    print(f"{len(set(old) & set(new))} pages, {checked} sizes/ratios/accuracies compared, {len(bad)} differ")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
