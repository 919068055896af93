"""The Python API; the CLI is a thin shell over these functions.

    import pocketflow
    result = pocketflow.compress("configs/quickstart.yaml", target_ratio=8)
    print(result.best_dir, result.metrics["test_accuracy"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pocketflow.config import Config, load_config
from pocketflow.errors import PocketFlowError
from pocketflow.final import RunResult, finalize, log as _log  # noqa: F401  (finalize: part of the API)


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
    rundir: object = None  # pocketflow.rundir.RunDir: locked until close()
    shipped: object = None  # pocketflow.targets.Shipped: the file best/ will ship

    @property
    def target(self) -> dict:
        return self.cfg["target"]

    def close(self, ok: bool) -> None:
        """End the run: a finished one (`ok`) replaces a --force'd old run, a failed one puts it back;
        the run directory's lock is released either way. `compress` calls it; idempotent."""
        if self.rundir is None:
            return
        try:
            if ok:
                from pocketflow.faults import crash_point
                crash_point("run_finished")  # best/ swapped in, a --force'd old run not yet deleted
                self.rundir.commit()
            else:
                self.rundir.abort()
        finally:
            self.rundir.release()
            self.rundir = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)


def _as_config(config, overrides=(), target_ratio=None, **sections) -> Config:
    if isinstance(config, Config):
        if overrides or target_ratio is not None or sections:
            return load_config(config.raw, overrides, target_ratio, **sections)
        return config
    return load_config(config, overrides, target_ratio, **sections)


def open_run_dir(cfg: Config, output: str | None, resume: bool, force: bool):
    """Check and lock the run directory (rank 0; other ranks get rank 0's refusal too)."""
    from pocketflow.distributed import world
    from pocketflow.rundir import RunDir
    w = world()
    run = RunDir(Path(output or cfg["output"]["dir"]) / cfg["name"], resume, force, owner=w.is_root)
    error = None
    try:
        run.open()
    except PocketFlowError as e:
        error = e
    message = w.broadcast_object(None if error is None else str(error))
    if message is not None:
        raise error if error is not None else PocketFlowError(message)
    return run


def load_data_and_model(cfg: Config):
    from pocketflow.data import load_dataset
    from pocketflow.zoo import resolve_model
    data = load_dataset(cfg["data"], seed=cfg["seed"])
    model, pretrained = resolve_model(cfg["model"], data.input_shape, data.num_classes)
    return data, model, pretrained


def reuse_baseline(model, run_dir: Path) -> bool:
    """--resume: load the run's finished baseline into `model` (False if it has none yet). A
    baseline of another model or data shape is refused in one line, before anything is written."""
    import keras
    done = run_dir / "baseline" / "model.keras"
    if not done.exists():
        return False
    try:
        model.set_weights(keras.saving.load_model(done, compile=False).get_weights())
    except ValueError:  # the run was started with another model or image shape
        raise PocketFlowError(f"--resume: the baseline in {done.parent} was trained for another model or "
                              "data shape than this config gives; use --force to start over") from None
    _log(f"baseline: reusing {done}")
    return True


def train_baseline(model, data, cfg: Config, run_dir: Path | None = None):
    """Train a float model from scratch (zoo models), saved as the run's baseline."""
    import keras

    from pocketflow.distributed import world
    from pocketflow.io import atomic_save_model
    from pocketflow.training import Trainer
    _log(f"baseline: training {model.name} for {cfg['train']['epochs']} epochs")
    keras.utils.set_random_seed(cfg["seed"])
    Trainer(model, data, cfg["train"], seed=cfg["seed"],
            log_dir=(run_dir / "logs" / "baseline") if run_dir else None).fit()
    if run_dir is not None and world().is_root:
        atomic_save_model(model, run_dir / "baseline" / "model.keras")
    return model


def setup(config, overrides=(), target_ratio=None, output=None, resume=False, force=False,
          **sections) -> RunContext:
    """Check everything (config, run directory, data, model, learner, target), and only then start
    writing the run: nothing in the run directory changes for a run that is refused.

    The returned context holds the run directory's lock: `ctx.close(ok)` (or `with setup(...) as
    ctx:`) ends the run; `compress` does it for you."""
    import keras

    from pocketflow.checks import check_inputs
    from pocketflow.learners import LEARNERS
    cfg = _as_config(config, overrides, target_ratio, **sections)
    for note in cfg.notes:
        _log(note)
    keras.utils.set_random_seed(cfg["seed"])
    run = open_run_dir(cfg, output, resume, force)
    ctx = RunContext(cfg=cfg, run_dir=run.path, data=None, model=None, learner=None, resume=resume, rundir=run)
    try:
        ctx.data, ctx.model, pretrained = load_data_and_model(cfg)
        check_inputs(cfg, ctx.data, ctx.model)  # before the learner looks at the model
        ctx.learner = LEARNERS.get(cfg["learner"]["name"])(cfg["learner"], seed=cfg["seed"])
        ctx.learner.check(ctx.model)
        _ship(ctx)
        ctx.learner.check_target(ctx.model, cfg["target"]["metric"], cfg["target"]["ratio"])
        reused = not pretrained and resume and reuse_baseline(ctx.model, ctx.run_dir)
        _start_writing(ctx)
        if not (pretrained or reused):
            train_baseline(ctx.model, ctx.data, cfg, ctx.run_dir)
            _ship(ctx)  # the size model is calibrated on the trained weights (gzip depends on them)
        ctx.baseline = _baseline(ctx.model, ctx.data, ctx.shipped)
    except BaseException:
        ctx.close(ok=False)
        raise
    return ctx


def _start_writing(ctx: RunContext) -> None:
    from pocketflow.distributed import world
    from pocketflow.io import atomic_write_text
    if world().is_root:
        ctx.rundir.begin()  # --force: the old run is moved aside here, not deleted
        atomic_write_text(ctx.run_dir / "config.yaml", ctx.cfg.to_yaml())


def _ship(ctx: RunContext) -> None:
    """Decide the file the run ships and hand it to the learner (targets are measured on it)."""
    from pocketflow.targets import SIZE_METRICS, Shipped
    ctx.shipped = Shipped.for_run(ctx.cfg["export"], ctx.cfg["target"], ctx.learner.export_quantize, ctx.data)
    ctx.learner.ship(ctx.shipped)
    t = ctx.cfg["target"]
    if t["metric"] in SIZE_METRICS and t["ratio"] is not None:
        ctx.shipped.size_model(ctx.model)  # calibrated now, not on the search's clock


def _baseline(model, data, shipped) -> dict:
    from pocketflow import metrics as M
    baseline = {"val_accuracy": M.accuracy(model, data.x_val, data.y_val) if len(data.x_val) else None,
                "test_accuracy": M.accuracy(model, data.x_test, data.y_test),
                "params": M.count_params(model), "macs": M.count_macs(model),
                "float_bytes": M.float_bytes(model),
                "tflite_bytes": int(shipped.baseline_value(model, "size")),
                "tflite_gzip_bytes": int(shipped.baseline_value(model, "download_size"))}
    _log(f"baseline: test accuracy {baseline['test_accuracy']:.4f}, {baseline['params']:,} params, "
         f"{baseline['macs']:,} MACs, float TFLite {baseline['tflite_bytes']:,} B "
         f"(gzip {baseline['tflite_gzip_bytes']:,} B)")
    return baseline


def default_point(ctx: RunContext) -> dict:
    """The learner's config-driven point, projected onto the target if one is set."""
    params = ctx.learner.default_params(ctx.model)
    t = ctx.target
    if t["ratio"] is not None:
        params = ctx.learner.project(ctx.model, params, t["metric"], t["ratio"])
    return params


def compress(config, overrides=(), target_ratio=None, output=None, resume=False, force=False,
             **sections) -> RunResult:
    """Run PocketFlow end to end: baseline, (search,) compress, fine-tune, export."""
    with setup(config, overrides, target_ratio, output, resume, force, **sections) as ctx:
        if ctx.cfg["search"]["optimizer"] == "none":
            return finalize(ctx, default_point(ctx))
        from pocketflow.hpo.search import run_search
        params, summary = run_search(ctx)
        if "pareto" in summary:  # every front point fine-tuned and exported (pocketflow.front)
            from pocketflow.front import finalize_front
            return finalize_front(ctx, summary)
        return finalize(ctx, params, summary)


def train(config, overrides=(), output=None, force=False, resume=False, **sections) -> RunResult:
    """Train a float baseline and export it (the `full_precision` learner, no search)."""
    sections.setdefault("learner", {"name": "full_precision", "fine_tune": {"epochs": 0}})
    sections.setdefault("search", {"optimizer": "none"})
    return compress(config, overrides, output=output, force=force, resume=resume, **sections)


def _model_file(model_path) -> Path:
    """A model path as given, or a run directory's best/model.keras."""
    p = Path(model_path)
    if not p.is_dir():
        return p
    if not (p / "best" / "model.keras").is_file():
        raise PocketFlowError(f"{p}: no best/model.keras in this directory (not a finished run)")
    return p / "best" / "model.keras"


def _dataset_for(model: Path, data: dict | None, need: bool):
    """`data` if given; else, for a model inside a run directory, that run's data (its config.yaml);
    else a one-line refusal when `need`, None otherwise."""
    from pocketflow.data import load_dataset
    from pocketflow.rundir import find_run_dir
    if data is not None:
        return load_dataset(data)
    run = find_run_dir(model)
    if run is None:
        if need:
            raise PocketFlowError(f"{model} is not inside a run directory, so its data is unknown: pass --data "
                                  "(a dataset name or .npz file)")
        return None
    saved = _saved_config(run / "config.yaml")
    return load_dataset(saved["data"], seed=saved.get("seed", 0))


def _saved_config(path: Path) -> dict:
    """A run's config.yaml as written (complete and validated when the run started)."""
    import yaml
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PocketFlowError(f"{path}: cannot read the run's config ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("data"), dict):
        raise PocketFlowError(f"{path}: not a PocketFlow run config (no data section)")
    return saved


def evaluate(model_path, data: dict | None = None, unsafe_load: bool = False) -> dict:
    """Accuracy of a `.keras` or `.tflite` model on a dataset's test split (default: a run's own
    data, for a model inside a run directory)."""
    from pocketflow import metrics as M
    from pocketflow.zoo import load_keras_file
    p = _model_file(model_path)
    if not p.is_file():
        raise PocketFlowError(f"model file not found: {p}")
    data = _dataset_for(p, data, need=True)
    if p.suffix == ".tflite":
        return {"test_accuracy": M.tflite_accuracy(p.read_bytes(), data.x_test, data.y_test)}
    model = load_keras_file(p, unsafe_load)
    return {"test_accuracy": M.accuracy(model, data.x_test, data.y_test)}


def export(model_path, formats=("tflite",), quantize: str | None = None, data: dict | None = None,
           output=None, weight_scales: str = "auto", unsafe_load: bool = False, sparse_encoding: str = "off") -> dict:
    """Export a run's best model or a `.keras` file (default: next to it). Into a run's own best/,
    the files and best/metrics.json are replaced together (one rename, under the run's lock), so
    metrics.json always describes the files on disk."""
    from pocketflow.export import export_model
    from pocketflow.rundir import editing_best, find_run_dir, locked
    from pocketflow.zoo import load_keras_file
    src = _model_file(model_path)
    model = load_keras_file(src, unsafe_load)
    ds = _dataset_for(src, data, need=False)
    if quantize == "int8" and ds is None:
        raise PocketFlowError("--quantize int8 needs --data (calibration images from its training split)")
    out = Path(output) if output else src.parent
    kw = {"formats": tuple(formats), "quantize": quantize, "data": ds, "verify": ds is not None,
          "stem": src.stem, "weight_scales": weight_scales, "sparse_encoding": sparse_encoding}
    run = find_run_dir(src)
    best = run / "best" if run is not None else None
    if best is None or not (best / "metrics.json").is_file() or out.resolve() != best.resolve():
        return export_model(model, out, **kw)
    with locked(run), editing_best(run) as staging:
        res = export_model(model, staging, **kw)
        _describe_exports(staging / "metrics.json", res["files"], best, tuple(model.input_shape[1:]))
    return res


def _describe_exports(metrics_path: Path, files: dict, best: Path, input_shape: tuple) -> None:
    """Record freshly written files in metrics.json (sizes, checks) with their final paths."""
    import json

    from pocketflow.io import atomic_write_json
    metrics = json.loads(metrics_path.read_text())
    exports = metrics.setdefault("exports", {})
    for key, entry in files.items():
        entry["path"] = str(best / Path(entry["path"]).name)
        exports[key] = entry
    for entry in exports.values():  # where they are now (the run directory may have been moved)
        if "path" in entry and (metrics_path.parent / Path(entry["path"]).name).exists():
            entry["path"] = str(best / Path(entry["path"]).name)
    shipped = (metrics.get("shipped") or {}).get("file")
    if shipped in {Path(e["path"]).name for e in files.values() if "path" in e}:
        from pocketflow.targets import remeasure
        remeasure(metrics, (metrics_path.parent / shipped).read_bytes(), input_shape)
        metrics["shipped"]["test_accuracy"] = next((e.get("test_accuracy") for e in files.values()
                                                    if Path(e.get("path", "")).name == shipped), None)
    atomic_write_json(metrics_path, metrics)


def best(run_dir, ratio: float | None = None, metric: str | None = None) -> dict:
    """The best result of a finished run: its metrics and checkpoint path; with `ratio`, the most
    accurate exported pareto point meeting it (`metric`: default the run's first objective)."""
    import json
    if ratio is not None or metric is not None:
        from pocketflow.front import pick
        return pick(run_dir, ratio, metric)
    p = Path(run_dir) / "best" / "metrics.json"
    if not p.is_file():
        raise PocketFlowError(f"{run_dir}: no finished result (best/metrics.json missing)")
    m = json.loads(p.read_text())
    m["checkpoint"] = str(Path(run_dir) / "best" / "model.keras")
    return m
