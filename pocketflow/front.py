"""Pareto mode's end of a run, and the questions asked of it afterwards.

`finalize_front`: the front points chosen (`search.pareto_points`: all, or the K spread most
evenly) each get the final fine-tune and export of pocketflow.final into `pareto/<k>/` (the
same code and atomic swap as best/); a point already exported for the same trial is kept, so a
run killed during the final fine-tunes resumes with the next point. best/ is then a copy of the
most accurate exported point meeting `target.ratio` (any point without one), swapped in at once.
`pick` answers `pocketflow best RUN --ratio R`; `front_lines` prints `pocketflow front RUN`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pocketflow.errors import PocketFlowError
from pocketflow.final import RunResult, finalize, log


def _done(dest: Path, trial: int) -> dict | None:
    """The metrics of a point exported before for this trial (None: export it)."""
    try:
        m = json.loads((dest / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return m if (m.get("pareto") or {}).get("trial") == trial else None


def finalize_front(ctx, summary: dict) -> RunResult:
    from pocketflow.distributed import world
    from pocketflow.faults import crash_point
    from pocketflow.hpo.pareto import spread
    from pocketflow.io import atomic_write_json
    p, root = summary["pareto"], world().is_root
    rows = spread(p["front"], p["points"])
    base = ctx.run_dir / "pareto"
    if root:
        base.mkdir(exist_ok=True)
        chosen = {r["trial"]: k for k, r in enumerate(rows)}
        atomic_write_json(base / "front.json", {"objectives": p["objectives"], "front": [
            {**r, "point": chosen.get(r["trial"])} for r in p["front"]]})
    log(f"pareto: {len(p['front'])} point(s) on the front; exporting {len(rows)} to {base}")
    results = []
    for k, row in enumerate(rows):
        dest = base / str(k)
        kept = world().broadcast_object(_done(dest, row["trial"]) if root else None)
        if kept is not None:
            log(f"pareto/{k}: kept (trial {row['trial']}, exported before)")
            results.append(kept)
            continue
        log(f"pareto/{k}: trial {row['trial']}, val_acc {row['val_acc']:.4f}, "
            + ", ".join(f"{m} {v:.2f}x" for m, v in row["ratios"].items()) + ": final fine-tune")
        info = {"point": k, "trial": row["trial"], "objectives": p["objectives"],
                "search_val_acc": row["val_acc"], "search_ratios": row["ratios"]}
        res = finalize(ctx, row["params"], {**summary, "best_trial": row["trial"]}, dest=f"pareto/{k}",
                       extra={"pareto": info})
        results.append(res.metrics)
        crash_point("pareto_point")  # point k exported, the next not started
    if root:
        for old in base.iterdir():  # points of an earlier front (a resumed search that went on)
            if old.is_dir() and old.name.isdigit() and int(old.name) >= len(rows):
                shutil.rmtree(old)
    metrics = world().broadcast_object(_publish_best(ctx, results) if root else None)
    _rewrite_report(ctx)
    return RunResult(run_dir=ctx.run_dir, best_dir=ctx.run_dir / "best", metrics=metrics, params=metrics["params"])


def _publish_best(ctx, results: list[dict]) -> dict:
    """best/ := a copy of the most accurate exported point meeting the target, in one swap."""
    from pocketflow.io import atomic_replace_dir, atomic_write_json, make_temp_dir
    ok = [m for m in results if m.get("target_met", True)] or results
    m = max(ok, key=lambda m: (m.get("val_accuracy") or 0.0, m["test_accuracy"], -m["pareto"]["point"]))
    src, best = ctx.run_dir / "pareto" / str(m["pareto"]["point"]), ctx.run_dir / "best"
    staging = make_temp_dir(ctx.run_dir, ".best.")
    shutil.copytree(src, staging, dirs_exist_ok=True)
    m = json.loads((src / "metrics.json").read_text())
    for entry in m.get("exports", {}).values():
        if "path" in entry:
            entry["path"] = str(best / Path(entry["path"]).name)
    atomic_write_json(staging / "metrics.json", m)
    atomic_replace_dir(staging, best)
    log(f"best model: {best / 'model.keras'} = pareto/{m['pareto']['point']} (trial {m['pareto']['trial']}, "
        f"test accuracy {m['test_accuracy']:.4f})")
    return m


def _rewrite_report(ctx) -> None:
    """report.md again, now with the exported points' test values (a failure only warns)."""
    from pocketflow.distributed import world
    if not world().is_root:
        return
    import sys

    import optuna

    from pocketflow.hpo.report import write_report
    s = ctx.cfg["search"]
    url = s["storage"] or f"sqlite:///{(ctx.run_dir / 'study.db').resolve()}"
    try:
        write_report(optuna.load_study(study_name=s["study_name"] or ctx.cfg["name"], storage=url), ctx.run_dir)
    except Exception as e:
        print(f"pareto: warning: report not rewritten ({type(e).__name__}: {e})", file=sys.stderr)


# -- after the run ---------------------------------------------------------------------------------
def _points(run_dir) -> list[dict]:
    from pocketflow.hpo.pareto_report import exported
    points = exported(run_dir)
    if not points:
        raise PocketFlowError(f"{run_dir}: no exported pareto points (pareto/<k>/metrics.json); --ratio and "
                              "`pocketflow front` need a finished run with search.objective: pareto")
    return points


def pick(run_dir, ratio: float, metric: str | None = None) -> dict:
    """The most accurate (validation, then test accuracy) exported point whose measured `metric`
    ratio meets `ratio` (within the search's 1% tolerance); one-line refusal when none does."""
    from pocketflow.targets import METRICS, TOLERANCE, canonical
    if ratio is None:
        raise PocketFlowError("--metric needs --ratio R (the ratio the point must meet)")
    points = _points(run_dir)
    metric = canonical(metric)[0] if metric else points[0]["pareto"]["objectives"][1]
    if metric not in METRICS:
        raise PocketFlowError(f"--metric {metric!r} is not a target metric; choose from: {', '.join(METRICS)}")
    ok = [m for m in points if m["ratios"][metric] >= ratio * (1 - TOLERANCE)]
    if not ok:
        top = max(points, key=lambda m: m["ratios"][metric])
        raise PocketFlowError(f"no exported point of {run_dir} meets {metric} {ratio:g}x (the highest is "
                              f"{top['ratios'][metric]:.2f}x, pareto/{top['pareto']['point']})")
    m = max(ok, key=lambda m: (m.get("val_accuracy") or 0.0, m["test_accuracy"], -m["pareto"]["point"]))
    return {**m, "checkpoint": str(Path(m["dir"]) / "model.keras")}


def front_lines(run_dir) -> list[str]:
    """`pocketflow front RUN`: the whole front as a table (exported points measured on test)."""
    from pocketflow.hpo.pareto_report import merged, table
    path = Path(run_dir) / "pareto" / "front.json"
    try:
        front = json.loads(path.read_text())
    except (OSError, ValueError):
        raise PocketFlowError(f"{run_dir}: no pareto/front.json (not a finished run with search.objective: "
                              "pareto)") from None
    rows = merged(front["front"], run_dir)
    return [f"front of {', '.join(front['objectives'])}: {len(rows)} point(s), "
            f"{sum(r['point'] is not None for r in rows)} exported"] + table(rows)
