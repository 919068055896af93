"""The final fine-tune and export of one point: the full fine-tuning budget, test accuracy,
every file and metrics.json staged next to the run and swapped into place in one rename, so a
kill leaves the destination as it was (best/, or a pareto point's pareto/<k>/: one code path)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    run_dir: Path
    best_dir: Path
    metrics: dict
    params: dict


def log(msg: str) -> None:
    from pocketflow.distributed import world
    if world().is_root:
        print(msg, flush=True)


def finalize(ctx, params: dict, search_summary: dict | None = None, dest: str = "best",
             extra: dict | None = None) -> RunResult:
    """Compress with the full fine-tuning budget, evaluate on test, export to `run_dir/dest`
    (best/, or a pareto point's pareto/<k>/) atomically; `extra` goes into its metrics.json."""
    from pocketflow import metrics as M
    from pocketflow.distributed import world
    from pocketflow.export import export_model
    from pocketflow.faults import crash_point
    from pocketflow.io import atomic_replace_dir, atomic_write_json, make_temp_dir
    from pocketflow.learners import Budget
    from pocketflow.targets import meet_target, ratio_line, shipped_record
    cfg, learner = ctx.cfg, ctx.learner
    ft = cfg["learner"]["fine_tune"]
    t0 = time.perf_counter()
    budget = Budget(epochs=ft["epochs"], steps=ft.get("steps"))
    comp = learner.compress(ctx.model, params, ctx.data, budget)
    params, comp = meet_target(ctx.target, learner, ctx.model, ctx.data, params, comp, budget, log)
    ctx.shipped = learner.shipped_for(params) or ctx.shipped  # a method search ships its method's file type
    metrics = {
        "learner": learner.name, "params": params, "baseline": ctx.baseline,
        "test_accuracy": M.accuracy(comp.deploy, ctx.data.x_test, ctx.data.y_test),
        "val_accuracy": M.accuracy(comp.deploy, ctx.data.x_val, ctx.data.y_val) if len(ctx.data.x_val) else None,
        "size_bytes": comp.size_bytes, "params_count": M.count_params(comp.deploy),
        "macs": M.count_macs(comp.deploy), "info": comp.info,
        "target": ctx.target, "fine_tune_seconds": time.perf_counter() - t0,
    }
    if search_summary:
        metrics["search"] = search_summary
    metrics.update(extra or {})
    best = ctx.run_dir / dest
    if world().is_root:
        staging = make_temp_dir(ctx.run_dir, ".best.")
        exp = cfg["export"]
        deploy = None if ctx.shipped.deploy == "float" else ctx.shipped.deploy
        files = export_model(comp.deploy, staging, exp["formats"], deploy, ctx.data, exp["verify"],
                             weight_scales=exp["weight_scales"], sparse_encoding=exp["sparse_encoding"])
        files["files"].update(learner.export_extra(comp, staging))
        for entry in files["files"].values():  # paths as they will be after the swap
            if "path" in entry:
                entry["path"] = str(best / Path(entry["path"]).name)
        metrics["exports"] = files["files"]
        metrics.update(shipped_record(ctx.shipped, ctx.model, ctx.learner, comp, staging, metrics["exports"]))
        t = ctx.target
        if t["ratio"] is not None:
            from pocketflow.targets import TOLERANCE
            metrics["target_met"] = bool(metrics["ratios"][t["metric"]] >= t["ratio"] * (1 - TOLERANCE))
        atomic_write_json(staging / "metrics.json", metrics)
        crash_point("final_export")  # everything written, nothing swapped in yet
        best.parent.mkdir(parents=True, exist_ok=True)
        atomic_replace_dir(staging, best)
        what = "best model" if dest == "best" else dest
        log(f"{what}: {best / 'model.keras'} (test accuracy {metrics['test_accuracy']:.4f}"
             + (f"; shipped {ctx.shipped.file}: test accuracy {metrics['shipped']['test_accuracy']:.4f}"
                if metrics["shipped"].get("test_accuracy") is not None else "") + ")")
        log("ratios: " + ratio_line(metrics["measured"]))
        log("exported: " + ", ".join(
            f"{Path(e['path']).name} {e['bytes']:,} B" + (f" (gzip {e['gzip_bytes']:,} B)" if "gzip_bytes" in e else "")
            for e in metrics["exports"].values() if "path" in e and "bytes" in e))
    return RunResult(run_dir=ctx.run_dir, best_dir=best, metrics=metrics, params=params)
