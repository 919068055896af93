"""Helpers shared by the benchmark suites: learners through the public API, TFLite rows, pages."""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks"
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_avg(sep: str = " ") -> str:
    """The 1/5/15-minute load average: the machine is shared, numbers depend on it."""
    return sep.join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> str:
    import tensorflow as tf
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} cores ({platform.machine()}), TF {tf.__version__}, "
            f"load average at start {load:.2f}")


def learner_section(name: str, **kw) -> dict:
    """A validated `learner:` config section, exactly as YAML would give it."""
    from pocketflow.config import load_config
    cfg = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"},
                       "learner": {"name": name, **kw}})
    return cfg["learner"]


def run_learner(model, data, name: str, epochs: float, seed: int = 0, params: dict | None = None, **section):
    """Compress `model` with learner `name` (config keys as in YAML); returns (learner, Compressed)."""
    import keras

    from pocketflow.learners import LEARNERS, Budget
    section.setdefault("fine_tune", {})
    section["fine_tune"] = {"verbose": False, "batch_size": 128, **section["fine_tune"]}
    learner = LEARNERS.get(name)(learner_section(name, **section), seed=seed)
    keras.utils.set_random_seed(seed)
    p = learner.default_params(model) if params is None else params
    comp = learner.compress(model, p, data, Budget(epochs=epochs))
    return learner, comp


def tflite_row(name: str, model, data, quantize: str | None, tool: str = "pocketflow") -> dict:
    """Accuracy (TFLite, full test split), file and gzip'd size, latency at batch 1 and 32."""
    from pocketflow import metrics as M
    from pocketflow.export import to_tflite
    blob = to_tflite(model, quantize, data.representative() if quantize == "int8" else None)
    shape = tuple(model.input_shape[1:])
    return {"tool": tool, "name": name, "keras_accuracy": M.accuracy(model, data.x_test, data.y_test),
            "tflite_accuracy": M.tflite_accuracy(blob, data.x_test, data.y_test),
            "tflite_bytes": len(blob), "tflite_gzip_bytes": M.gzip_size(blob),
            "latency_ms_b1": M.tflite_latency(blob, shape, 1), "latency_ms_b32": M.tflite_latency(blob, shape, 32)}


def run_peer(npz: Path, *args) -> dict:
    """The TFMOT pipeline in its own process (legacy tf_keras); returns its JSON."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "peer.json"
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        cmd = [sys.executable, str(Path(__file__).with_name("tfmot_peer.py")), "--data", str(npz),
               "--out", str(out), *map(str, args)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"TFMOT peer failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def dataset_npz(data, path: Path) -> Path:
    """Write a Dataset's train+val / test arrays as uint8 .npz for the peer process."""
    x_tr = np.concatenate([data.x_train, data.x_val])
    y_tr = np.concatenate([data.y_train, data.y_val])
    to8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)  # noqa: E731
    np.savez(path, x_train=to8(x_tr), y_train=y_tr, x_test=to8(data.x_test), y_test=data.y_test)
    return path


def md_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """cols: (key, header, format)."""
    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _, f in cols:
            v = r.get(k)
            cells.append("" if v is None else (format(v, f) if f else str(v)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_page(name: str, title: str, command: str, body: str, started: float, extra: dict | None = None):
    DOCS.mkdir(parents=True, exist_ok=True)
    wall = time.time() - started
    head = (f"# {title}\n\nCommand: `{command}`  \nDate: {dt.datetime.now():%Y-%m-%d %H:%M}  \n"
            f"Machine: {machine()}  \nWall time: {wall / 60:.1f} min\n\n")
    (DOCS / f"{name}.md").write_text(head + body.rstrip() + "\n")
    if extra is not None:
        (DOCS / f"{name}.json").write_text(json.dumps(extra, indent=2, default=float))
    print(f"wrote {DOCS / (name + '.md')} ({wall / 60:.1f} min)")


def plot(path: Path, fn, figsize=(6, 4)) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=figsize)
    fn(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
