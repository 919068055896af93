"""Shared fixtures: a small real Fashion-MNIST sample (shipped in tests/data) and a trained seed CNN.

Keep tests fast: the whole README test command must stay well under 30 minutes on 2 cores.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
SMALL_NPZ = ROOT / "tests" / "data" / "fashion_mnist_small.npz"  # 3000 train / 1000 test, real images
SHARED_MODELS = ROOT.parent / "shared" / "models"


@pytest.fixture(scope="session")
def small_npz() -> Path:
    return SMALL_NPZ


@pytest.fixture(scope="session")
def small_data():
    from pocketflow.data import load_dataset
    return load_dataset({"name": "npz", "path": str(SMALL_NPZ), "val_split": 0.1})


@pytest.fixture(scope="session")
def trained_seed_cnn(small_data):
    """The tutorial CNN trained briefly on the small sample (~0.75 test accuracy)."""
    import keras

    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(0)
    model = build_model("seed_cnn", small_data.input_shape, small_data.num_classes)
    cfg = {"epochs": 3, "batch_size": 64, "optimizer": "adam", "learning_rate": 2e-3,
           "schedule": "constant", "verbose": False}
    Trainer(model, small_data, cfg).fit()
    return model


def fine_tune_cfg(**kw) -> dict:
    """A complete `fine_tune` section for learner tests."""
    from pocketflow.schema import TRAIN, validate_section
    return validate_section({"verbose": False, **kw}, TRAIN, "learner.fine_tune", "<test>")


def learner_cfg(name: str, **kw) -> dict:
    """A validated `learner:` section (defaults filled in) for constructing learners in tests."""
    from pocketflow.config import load_config
    section = {"name": name, "fine_tune": {"verbose": False, "epochs": 1, "batch_size": 64}, **kw}
    cfg = load_config({"data": {"name": "npz", "path": str(SMALL_NPZ)}, "model": {"name": "seed_cnn"},
                       "learner": section})
    return cfg["learner"]


def run_cli(*args, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """Run `python -m pocketflow ...` as a user would; returns the completed process."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pocketflow", *map(str, args)], cwd=cwd or ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def run_cli_inprocess(*args, cwd=None) -> subprocess.CompletedProcess:
    """`pocketflow.cli.main(args)` in this process, its output captured: the same entry point as
    `python -m pocketflow` without a TensorFlow import per call (error-path tests run in seconds).
    An exception escaping main is printed as the traceback `python -m` would print, exit 1."""
    import contextlib
    import io
    import traceback

    from pocketflow.cli import main
    out, err, old = io.StringIO(), io.StringIO(), Path.cwd()
    os.chdir(cwd or ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(old)
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def assert_one_line_error(proc, *pieces, code=2):
    """One non-empty line on stderr, starting 'pocketflow: error: ', containing every piece."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pocketflow: error: ")
    assert "Traceback" not in proc.stderr + proc.stdout
    for p in pieces:
        assert p in lines[0], lines[0]
    return lines[0]


USER_LAYER_SOURCE = '''
import keras


@keras.saving.register_keras_serializable(package="{package}")
class Scale(keras.layers.Layer):
    """A user's custom layer: PocketFlow cannot know what it does with channels."""

    def call(self, x):
        return x * 2.0
'''


def user_layer_module(directory: Path, module: str):
    """Write a user's module defining a registered custom layer `Scale` into `directory` (where
    a CLI run started there finds it through model.imports) and import it here; returns `Scale`."""
    import importlib
    (directory / f"{module}.py").write_text(USER_LAYER_SOURCE.format(package=module))
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module(module).Scale
    finally:
        sys.path.remove(str(directory))


def wait_for(pred, timeout=240, what="condition"):
    """Poll `pred` until it returns something truthy (exceptions count as not yet)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got = pred()
        except Exception:  # the database may not exist yet, or is being created
            got = None
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
