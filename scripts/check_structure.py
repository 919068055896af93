#!/usr/bin/env python3
"""The house's two structural rules, checked on the source (nothing is imported or run):

1. Rooms small enough to know: no module over MAX_MODULE lines, no function over MAX_FUNCTION
   lines in pocketflow/, learners/, hpo/ (tests and benchmarks aside). Prints the longest ones.
2. No import cycle among PocketFlow's modules, counting function-local imports too (a local
   import that hides a cycle is still a cycle; local imports are for keeping TensorFlow lazy).

Exit 1 when a rule is broken. `python scripts/check_structure.py [--top N]`; CI runs it.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pocketflow": "pocketflow", "learners": "pocketflow.learners", "hpo": "pocketflow.hpo"}
MAX_MODULE, MAX_FUNCTION = 400, 60


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, through the pyproject package-dir mapping."""
    out = {}
    for folder, dotted in PACKAGES.items():
        for p in sorted((root / folder).rglob("*.py")):
            if p.is_symlink() or any(part.is_symlink() for part in p.relative_to(root).parents if part != Path(".")):
                continue
            parts = list(p.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([dotted, *parts])] = p
    return out


def sizes(mods: dict[str, Path]) -> tuple[list, list]:
    """(module lines, function lines), longest first, as (lines, where) pairs."""
    mod_rows, fn_rows = [], []
    for name, p in mods.items():
        src = p.read_text()
        mod_rows.append((len(src.splitlines()), str(p.relative_to(ROOT))))
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                fn_rows.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(mod_rows, reverse=True), sorted(fn_rows, reverse=True)


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> PocketFlow modules it imports anywhere in its body."""
    graph = {m: set() for m in mods}
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import pocketflow.x.y` of a non-module name
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=5, help="how many of the longest to print")
    args = ap.parse_args(argv)
    mods = modules()
    mod_rows, fn_rows = sizes(mods)
    print(f"longest modules (limit {MAX_MODULE} lines):")
    for n, where in mod_rows[: args.top]:
        print(f"  {n:5d}  {where}")
    print(f"longest functions (limit {MAX_FUNCTION} lines):")
    for n, where in fn_rows[: args.top]:
        print(f"  {n:5d}  {where}")
    bad = [f"module {w}: {n} lines" for n, w in mod_rows if n > MAX_MODULE]
    bad += [f"function {w}: {n} lines" for n, w in fn_rows if n > MAX_FUNCTION]
    bad += ["import cycle: " + " <-> ".join(c) for c in cycles(import_graph(mods))]
    for b in bad:
        print(f"check_structure: {b}", file=sys.stderr)
    print(f"check_structure: {len(mods)} modules, {'FAIL' if bad else 'ok'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
