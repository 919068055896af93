"""The Python API; the CLI is a thin shell over these functions.

    import pocketflow
    result = pocketflow.compress("configs/quickstart.yaml", target_ratio=8)
    print(result.best_dir, result.metrics["test_accuracy"])
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pocketflow.config import Config, load_config
from pocketflow.errors import PocketFlowError


@dataclass
class RunContext:
    """Everything one run needs; handed to the search and the final export."""
    cfg: Config
    run_dir: Path
    data: object
    model: object  # the trained float model (the teacher)
    learner: object
    resume: bool = False
    baseline: dict = field(default_factory=dict)

    @property
    def target(self) -> dict:
        return self.cfg["target"]


@dataclass
class RunResult:
    run_dir: Path
    best_dir: Path
    metrics: dict
    params: dict


def _as_config(config, overrides=(), target_ratio=None, **sections) -> Config:
    if isinstance(config, Config):
        if overrides or target_ratio is not None or sections:
            return load_config(config.raw, overrides, target_ratio, **sections)
        return config
    return load_config(config, overrides, target_ratio, **sections)


def _log(msg: str) -> None:
    from pocketflow.distributed import world
    if world().is_root:
        print(msg, flush=True)


def prepare_run_dir(cfg: Config, output: str | None, resume: bool, force: bool) -> Path:
    from pocketflow.distributed import world
    base = Path(output or cfg["output"]["dir"])
    run_dir = base / cfg["name"]
    if not world().is_root:
        return run_dir
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as e:
        raise PocketFlowError(f"output directory {base} is not writable ({e.strerror})") from None
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            shutil.rmtree(run_dir)
        elif not resume:
            raise PocketFlowError(f"run directory {run_dir} already exists; use --resume to continue it "
                                  "or --force to start over")
    run_dir.mkdir(parents=True, exist_ok=True)
    recover_run_dir(run_dir)
    return run_dir


def recover_run_dir(run_dir: Path) -> None:
    """Undo what a killed process left half-done: staging dirs, a best/ swapped out but not in."""
    best, old = run_dir / "best", run_dir / ".best.old"
    if not best.exists() and old.exists():
        os.replace(old, best)
    for p in run_dir.glob(".best.*"):
        shutil.rmtree(p, ignore_errors=True)
    for pattern in (".*.tmp", ".*.keras"):  # temp files of pocketflow.io's atomic writes
        for p in run_dir.rglob(pattern):
            p.unlink(missing_ok=True)


def load_data_and_model(cfg: Config):
    from pocketflow.data import load_dataset
    from pocketflow.zoo import resolve_model
    data = load_dataset(cfg["data"], seed=cfg["seed"])
    model, pretrained = resolve_model(cfg["model"], data.input_shape, data.num_classes)
    return data, model, pretrained


def train_baseline(model, data, cfg: Config, run_dir: Path | None = None, resume: bool = False):
    """Train a float model from scratch (zoo models); reuses a finished baseline on --resume."""
    import keras

    from pocketflow.distributed import world
    from pocketflow.io import atomic_save_model
    from pocketflow.training import Trainer
    done = run_dir / "baseline" / "model.keras" if run_dir else None
    if resume and done is not None and done.exists():
        _log(f"baseline: reusing {done}")
        model.set_weights(keras.saving.load_model(done, compile=False).get_weights())
        return model
    _log(f"baseline: training {model.name} for {cfg['train']['epochs']} epochs")
    keras.utils.set_random_seed(cfg["seed"])
    Trainer(model, data, cfg["train"], seed=cfg["seed"],
            log_dir=(run_dir / "logs" / "baseline") if run_dir else None).fit()
    if done is not None and world().is_root:
        atomic_save_model(model, done)
    return model


def setup(config, overrides=(), target_ratio=None, output=None, resume=False, force=False,
          **sections) -> RunContext:
    """Validate the config, load data and model, train the baseline if needed, build the learner."""
    import keras

    from pocketflow import metrics as M
    from pocketflow.io import atomic_write_text
    from pocketflow.learners import LEARNERS
    cfg = _as_config(config, overrides, target_ratio, **sections)
    for note in cfg.notes:
        _log(note)
    keras.utils.set_random_seed(cfg["seed"])
    run_dir = prepare_run_dir(cfg, output, resume, force)
    data, model, pretrained = load_data_and_model(cfg)
    learner = LEARNERS.get(cfg["learner"]["name"])(cfg["learner"], seed=cfg["seed"])
    learner.check(model)
    learner.check_target(model, cfg["target"]["metric"], cfg["target"]["ratio"])
    from pocketflow.distributed import world
    if world().is_root:
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    if not pretrained:
        train_baseline(model, data, cfg, run_dir, resume)
    baseline = {"val_accuracy": M.accuracy(model, data.x_val, data.y_val) if len(data.x_val) else None,
                "test_accuracy": M.accuracy(model, data.x_test, data.y_test),
                "params": M.count_params(model), "macs": M.count_macs(model),
                "float_bytes": M.float_bytes(model)}
    _log(f"baseline: test accuracy {baseline['test_accuracy']:.4f}, {baseline['params']:,} params, "
         f"{baseline['macs']:,} MACs")
    return RunContext(cfg=cfg, run_dir=run_dir, data=data, model=model, learner=learner,
                      resume=resume, baseline=baseline)


def default_point(ctx: RunContext) -> dict:
    """The learner's config-driven point, projected onto the target if one is set."""
    params = ctx.learner.default_params(ctx.model)
    t = ctx.target
    if t["ratio"] is not None:
        params = ctx.learner.project(ctx.model, params, t["metric"], t["ratio"])
    return params


def finalize(ctx: RunContext, params: dict, search_summary: dict | None = None) -> RunResult:
    """Compress with the full fine-tuning budget, evaluate on test, export to best/ atomically."""
    from pocketflow import metrics as M
    from pocketflow.distributed import world
    from pocketflow.export import export_model
    from pocketflow.faults import crash_point
    from pocketflow.io import atomic_replace_dir, atomic_write_json
    from pocketflow.learners import Budget
    cfg, learner = ctx.cfg, ctx.learner
    ft = cfg["learner"]["fine_tune"]
    t0 = time.perf_counter()
    comp = learner.compress(ctx.model, params, ctx.data, Budget(epochs=ft["epochs"], steps=ft.get("steps")))
    metrics = {
        "learner": learner.name, "params": params, "baseline": ctx.baseline,
        "test_accuracy": M.accuracy(comp.deploy, ctx.data.x_test, ctx.data.y_test),
        "val_accuracy": M.accuracy(comp.deploy, ctx.data.x_val, ctx.data.y_val) if len(ctx.data.x_val) else None,
        "size_bytes": comp.size_bytes, "params_count": M.count_params(comp.deploy),
        "macs": M.count_macs(comp.deploy), "info": comp.info,
        "ratios": {m: learner.measure(ctx.model, comp, m) for m in ("compression", "flops", "params")},
        "target": ctx.target, "fine_tune_seconds": time.perf_counter() - t0,
    }
    if search_summary:
        metrics["search"] = search_summary
    best = ctx.run_dir / "best"
    if world().is_root:
        staging = Path(tempfile.mkdtemp(dir=ctx.run_dir, prefix=".best."))
        exp = cfg["export"]
        files = export_model(comp.deploy, staging, exp["formats"], exp["quantize"] or learner.export_quantize, ctx.data, exp["verify"], weight_scales=exp["weight_scales"])
        files["files"].update(learner.export_extra(comp, staging))
        for entry in files["files"].values():  # paths as they will be after the swap
            if "path" in entry:
                entry["path"] = str(best / Path(entry["path"]).name)
        metrics["exports"] = files["files"]
        atomic_write_json(staging / "metrics.json", metrics)
        crash_point("final_export")  # everything written, nothing swapped in yet
        atomic_replace_dir(staging, best)
        _log(f"best model: {best / 'model.keras'} (test accuracy {metrics['test_accuracy']:.4f}, "
             + ", ".join(f"{k} {v:.2f}x" for k, v in metrics["ratios"].items()) + ")")
        _log("exported: " + ", ".join(
            f"{Path(e['path']).name} {e['bytes']:,} B" + (f" (gzip {e['gzip_bytes']:,} B)" if "gzip_bytes" in e else "")
            for e in metrics["exports"].values() if "path" in e and "bytes" in e))
    return RunResult(run_dir=ctx.run_dir, best_dir=best, metrics=metrics, params=params)


def compress(config, overrides=(), target_ratio=None, output=None, resume=False, force=False,
             **sections) -> RunResult:
    """Run PocketFlow end to end: baseline, (search,) compress, fine-tune, export."""
    ctx = setup(config, overrides, target_ratio, output, resume, force, **sections)
    if ctx.cfg["search"]["optimizer"] == "none":
        return finalize(ctx, default_point(ctx))
    from pocketflow.hpo.search import run_search
    params, summary = run_search(ctx)
    return finalize(ctx, params, summary)


def train(config, overrides=(), output=None, force=False, resume=False, **sections) -> RunResult:
    """Train a float baseline and export it (the `full_precision` learner, no search)."""
    sections.setdefault("learner", {"name": "full_precision", "fine_tune": {"epochs": 0}})
    sections.setdefault("search", {"optimizer": "none"})
    return compress(config, overrides, output=output, force=force, resume=resume, **sections)


def evaluate(model_path, data: dict | None = None) -> dict:
    """Accuracy of a `.keras` or `.tflite` model on a dataset's test split."""
    from pocketflow import metrics as M
    from pocketflow.data import load_dataset
    from pocketflow.zoo import load_keras_file
    data = load_dataset(data or {"name": "fashion_mnist", "val_split": 0.0})
    p = Path(model_path)
    if p.suffix == ".tflite":
        if not p.is_file():
            raise PocketFlowError(f"model file not found: {p}")
        return {"test_accuracy": M.tflite_accuracy(p.read_bytes(), data.x_test, data.y_test)}
    model = load_keras_file(p)
    return {"test_accuracy": M.accuracy(model, data.x_test, data.y_test)}


def best(run_dir) -> dict:
    """The best result of a finished run: its metrics and checkpoint path."""
    import json
    p = Path(run_dir) / "best" / "metrics.json"
    if not p.is_file():
        raise PocketFlowError(f"{run_dir}: no finished result (best/metrics.json missing)")
    m = json.loads(p.read_text())
    m["checkpoint"] = str(Path(run_dir) / "best" / "model.keras")
    return m
