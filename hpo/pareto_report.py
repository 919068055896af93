"""The front as the report and `pocketflow front` show it: one row per non-dominated trial, with the
exported points' measured test values (pareto/<k>/metrics.json) over the search's validation ones.

Reads only files and the study (never the process that ran it), like hpo.report.
"""
from __future__ import annotations

import json
from pathlib import Path


def exported(run_dir) -> list[dict]:
    """metrics.json of every exported pareto point (with its `dir`), in point order."""
    out = []
    for p in sorted(Path(run_dir).glob("pareto/*/metrics.json"), key=lambda p: int(p.parent.name)
                    if p.parent.name.isdigit() else 1 << 30):
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if "pareto" in m:
            out.append({**m, "dir": str(p.parent)})
    return out


def merged(rows: list[dict], run_dir) -> list[dict]:
    """Front rows; an exported one gets its point, test accuracy and final measured ratios."""
    points = {m["pareto"]["trial"]: m for m in exported(run_dir)}
    out = []
    for r in rows:
        m = points.get(r["trial"])
        if m is None:
            out.append({**r, "point": None, "test_acc": None})
        else:
            out.append({**r, "point": m["pareto"]["point"], "test_acc": m["test_accuracy"],
                        "ratios": {k: m["ratios"][k] for k in r["ratios"]}, "dir": m["dir"]})
    return out


def table(rows: list[dict]) -> list[str]:
    """A markdown table of merged front rows (ratios: measured on the exported files where exported)."""
    metrics = list(rows[0]["ratios"]) if rows else []
    head = " | ".join(f"{m} ratio" for m in metrics)
    lines = [f"| point | trial | val acc (search) | test acc | {head} | dir |",
             "|---:|---:|---:|---:|" + "---:|" * len(metrics) + "---|"]
    for r in rows:
        test = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else ""
        point = "" if r["point"] is None else str(r["point"])
        lines.append(f"| {point} | {r['trial']} | {r['val_acc']:.4f} | {test} | "
                     + " | ".join(f"{r['ratios'][m]:.2f}x" for m in metrics) + f" | {r.get('dir', '')} |")
    return lines


def _plot(rows: list[dict], path: Path, save) -> bool:
    import matplotlib.pyplot as plt
    metrics = list(rows[0]["ratios"]) if rows else []
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        done = [r for r in rows if r["point"] is not None]
        rest = [r for r in rows if r["point"] is None]
        ax.scatter([r["ratios"][m] for r in rest], [r["val_acc"] for r in rest], facecolors="none",
                   edgecolors="tab:gray", label="front trial (validation)")
        ax.scatter([r["ratios"][m] for r in done], [r["test_acc"] for r in done], c="tab:red",
                   label="exported point (test)")
        for r in done:
            ax.annotate(f"pareto/{r['point']}", (r["ratios"][m], r["test_acc"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"measured {m} ratio (x)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0, 0].set_title("Pareto front")
    save(fig, path)
    return True


def section(study, run_dir, save) -> list[str]:
    """The report's front section (plot + table) of a multi-objective study; [] otherwise."""
    from pocketflow.hpo.pareto import front_rows
    objectives = (study.user_attrs.get("pocketflow") or {}).get("objectives")
    if not objectives:
        return []
    rows = merged(front_rows(study.get_trials(deepcopy=False), objectives[1:]), run_dir)
    lines = ["## Pareto front", "", f"{len(rows)} non-dominated trial(s) of {', '.join(objectives)}; "
             f"{sum(r['point'] is not None for r in rows)} exported (test accuracy and ratios measured on "
             "their files; the others are the search's validation values).", ""]
    if _plot(rows, Path(run_dir) / "front.png", save):
        lines += ["![Pareto front](front.png)", ""]
    return lines + table(rows) + [""]
