"""The bad-input corpus: every mistake a user makes gets one readable line and a non-zero exit.

Each case runs the real CLI and asserts the message text, the exit code and the absence of a
traceback: `pocketflow.cli.main` in this process for mistakes found before anything runs (config,
data and model files: seconds each), `python -m pocketflow` in a subprocess from the run on. A trial that goes wrong (NaN loss) is not an error of the run: it is
recorded as a failed trial with its reason and the search goes on.
"""
from __future__ import annotations

import json
import os
import textwrap

import pytest

from conftest import SMALL_NPZ, assert_one_line_error, run_cli, run_cli_inprocess, user_layer_module

DATA = f"data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1, limit_train: 600}}\n"
SMALL = DATA + "model: {name: seed_cnn}\ntrain: {epochs: 1, verbose: false}\n"


def run(tmp_path, text: str | None, *extra, env=None):
    """`pocketflow run c.yaml` with `text` as the config (None: no config file at all)."""
    cfg = tmp_path / "c.yaml"
    if text is not None:
        cfg.write_text(text)
    return run_cli("run", cfg, "--output", tmp_path / "runs", *extra, cwd=tmp_path, env=env)


def run_fast(tmp_path, text: str | None, *extra):
    """`run`, in this process: for a mistake found before anything runs."""
    cfg = tmp_path / "c.yaml"
    if text is not None:
        cfg.write_text(text)
    return run_cli_inprocess("run", cfg, "--output", tmp_path / "runs", *extra, cwd=tmp_path)


# -- config ---------------------------------------------------------------------------------------

CONFIG_CASES = {
    "malformed yaml": ("data: {name: npz\n", (), ["malformed YAML"]),
    "empty file": ("", (), ["missing required key 'data.name'"]),
    "top level not a mapping": ("- data\n- model\n", (), ["top level must be a mapping"]),
    "unknown key": (SMALL + "trian: {epochs: 1}\n", (), ["unknown key 'trian'", "did you mean 'train'"]),
    "wrong type": (SMALL.replace("epochs: 1,", "epochs: [1],"), (), ["'train.epochs' must be a number"]),
    "bad override value": (SMALL, ("--set", "train.epochs=abc"), ["'train.epochs' must be a number", "'abc'"]),
    "override without =": (SMALL, ("--set", "nonsense"), ["--set 'nonsense'", "KEY=VALUE"]),
    "negative epochs": (SMALL.replace("epochs: 1,", "epochs: -2,"), (), ["train.epochs"]),
    "unknown learner": (SMALL + "learner: {name: chainsaw}\n", (),
                        ["unknown value 'chainsaw'", "did you mean 'chain'", "weight_sparsity"]),
    "unknown optimizer": (SMALL + "search: {optimizer: bayes}\n", (), ["'search.optimizer'", "'bayes'", "tpe"]),
    "unknown model": (DATA + "model: {name: resnet21}\n", (), ["unknown model 'resnet21'", "resnet20"]),
    "unknown dataset": ("data: {name: imagenet}\nmodel: {name: seed_cnn}\n", (), ["unknown dataset 'imagenet'"]),
    "ratio below one": (SMALL, ("--target-ratio", "0.5"), ["'target.ratio' must be > 1", "0.5"]),
    "impossible target": (SMALL + "learner: {name: uniform_quant}\n", ("--target-ratio", "40"),
                          ["40x is out of reach", "uniform_quant", "maximum"]),
    "bad learner hyperparameter": (SMALL + "learner: {name: weight_sparsity, sparsity: 1.2}\n", (),
                                   ["sparsity", "1.2"]),
    "unknown int8 weight scales": (SMALL + "export: {weight_scales: per_row}\n", (),
                                   ["'export.weight_scales'", "'per_row'", "per_tensor"]),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_mistakes(tmp_path, name):
    text, extra, pieces = CONFIG_CASES[name]
    assert_one_line_error(run_fast(tmp_path, text, *extra), *pieces)


def test_config_file_not_found(tmp_path):
    assert_one_line_error(run_fast(tmp_path, None), "c.yaml", "config file not found")


# -- data -----------------------------------------------------------------------------------------

def test_missing_data_file(tmp_path):
    text = "data: {name: npz, path: /nonexistent/x.npz}\nmodel: {name: seed_cnn}\n"
    assert_one_line_error(run_fast(tmp_path, text), "/nonexistent/x.npz", "data file not found")


@pytest.mark.parametrize("content", [b"not a zip at all", SMALL_NPZ.read_bytes()[:3000]], ids=["garbage", "truncated"])
def test_corrupt_data_file(tmp_path, content):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    text = f"data: {{name: npz, path: {bad}}}\nmodel: {{name: seed_cnn}}\n"
    assert_one_line_error(run_fast(tmp_path, text), "bad.npz", "not a readable .npz file")


# -- models ---------------------------------------------------------------------------------------

def test_corrupt_keras_file(tmp_path):
    bad = tmp_path / "m.keras"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(run(tmp_path, DATA + f"model: {{name: {bad}}}\n"), "m.keras", "corrupt")


def _save_model(path, extra_layer):
    import keras
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = extra_layer(x)
    out = keras.layers.Dense(10)(keras.layers.Flatten()(x))
    keras.Model(inp, out).save(path)


def test_lambda_model_is_refused_in_safe_mode(tmp_path):
    import keras
    path = tmp_path / "lam.keras"
    _save_model(path, keras.layers.Lambda(lambda t: t * 2.0))
    assert_one_line_error(run(tmp_path, DATA + f"model: {{name: {path}}}\n"), "lam.keras", "--unsafe-load")




def test_custom_layer_not_imported_names_the_class_and_the_fix(tmp_path):
    path = tmp_path / "custom.keras"
    _save_model(path, user_layer_module(tmp_path, "userpkg_layers")())
    text = DATA + f"model: {{name: {path}}}\n"
    assert_one_line_error(run(tmp_path, text), "custom class 'Scale'", "model.imports")
    # the fix the message names works (the module is found in the working directory)
    ok = run(tmp_path, text + "train: {epochs: 0}\nexport: {formats: [keras], verify: false}\n",
             "--set", "model.imports=[userpkg_layers]", "--force")
    assert ok.returncode == 0, ok.stderr[-2000:]


USER_MODULE = '''
def boom(input_shape, num_classes):
    raise RuntimeError("user code exploded")

def not_a_model(input_shape, num_classes):
    return 42
'''


@pytest.mark.parametrize("spec, pieces", [
    ("usermodels:boom", ["'usermodels:boom' raised RuntimeError", "user code exploded"]),
    ("usermodels:not_a_model", ["'usermodels:not_a_model' returned int", "not a keras.Model"]),
    ("nomodule_here:build", ["cannot import", "nomodule_here"]),
])
def test_model_function_errors(tmp_path, spec, pieces):
    (tmp_path / "usermodels.py").write_text(USER_MODULE)
    assert_one_line_error(run(tmp_path, DATA + f"model: {{name: '{spec}'}}\n"), *pieces)


# -- the run directory ----------------------------------------------------------------------------

def test_output_dir_not_writable(tmp_path):
    if os.geteuid() == 0:
        ro = "/proc/pocketflow-runs"  # not creatable even for root
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        ro = tmp_path / "ro"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SMALL)
    assert_one_line_error(run_cli("run", cfg, "--output", ro), "not writable")


def test_existing_run_directory_needs_resume_or_force(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: again\n" + SMALL + "export: {formats: [keras], verify: false}\n")
    first = run_cli("run", cfg, "--output", tmp_path / "runs")
    assert first.returncode == 0, first.stderr[-2000:]
    before = sorted(p.name for p in (tmp_path / "runs" / "again").iterdir())
    assert_one_line_error(run_cli("run", cfg, "--output", tmp_path / "runs"), "already exists", "--resume", "--force")
    assert sorted(p.name for p in (tmp_path / "runs" / "again").iterdir()) == before  # nothing touched


def test_resume_of_a_run_that_never_existed(tmp_path):
    proc = run(tmp_path, "name: never\n" + SMALL, "--resume")
    assert_one_line_error(proc, "never", "nothing to resume", "without --resume")
    assert not (tmp_path / "runs").exists()  # refused before anything was written


# -- the search -----------------------------------------------------------------------------------

def test_unreachable_storage_is_one_line_and_hides_the_password(tmp_path):
    text = SMALL + textwrap.dedent("""\
        learner: {name: weight_sparsity}
        target: {metric: download_size, ratio: 4}
        search: {optimizer: tpe, trials: 2, storage: 'postgresql+psycopg2://user:topsecret@127.0.0.1:1/db'}
        """)
    proc = run(tmp_path, text)
    line = assert_one_line_error(proc, "search.storage", "127.0.0.1:1", "cannot open")
    assert "topsecret" not in proc.stderr + proc.stdout and "topsecret" not in line


def test_nan_trials_are_recorded_as_failures_and_the_search_goes_on(tmp_path):
    optuna = pytest.importorskip("optuna")
    text = "name: nan\n" + SMALL + textwrap.dedent("""\
        learner: {name: weight_sparsity, fine_tune: {optimizer: sgd, learning_rate: 1.0e+30, verbose: false}}
        target: {ratio: 2}
        search: {optimizer: random, trials: 2, pruner: none, trial_steps: 5}
        """)
    proc = run(tmp_path, text)
    # every trial failed, so no model meets the target: the run says why in one line
    assert_one_line_error(proc, "no trial", "meeting the target", "nan")
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{tmp_path / 'runs' / 'nan' / 'study.db'}")
    trials = study.get_trials()
    assert len(trials) == 2  # the first failure did not stop the search
    for t in trials:
        assert t.state == optuna.trial.TrialState.FAIL
        assert "nan" in t.user_attrs["fail_reason"]
    assert proc.stdout.count("fail: loss became nan") == 2


def test_searched_learning_rate_reaches_the_trainer(tmp_path):
    """`fine_tune/learning_rate`, an optional dimension, changes what a trial trains with: a
    range of absurd rates makes the trial fail as NaN, a sane range completes."""
    optuna = pytest.importorskip("optuna")
    base = SMALL + "learner: {name: full_precision, fine_tune: {verbose: false}}\n"
    for lr, state in ((1e30, "FAIL"), (1e-3, "COMPLETE")):
        name = f"lr{int(lr > 1)}"
        text = f"name: {name}\n" + base + (
            f"search: {{optimizer: random, trials: 1, pruner: none, trial_steps: 5, "
            f"space: {{fine_tune/learning_rate: [{lr}, {2 * lr}]}}}}\nexport: {{formats: [keras], verify: false}}\n")
        run(tmp_path, text)
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / name / 'study.db'}")
        assert [t.state.name for t in study.get_trials()] == [state], name
        if state == "COMPLETE":
            assert json.loads((tmp_path / "runs" / name / "best" / "metrics.json").read_text())["test_accuracy"] > 0.3


def test_resume_with_another_model_shape_is_refused_and_changes_nothing(tmp_path):
    """--resume on a run whose baseline was trained for RGB images, now given grayscale ones: one
    line naming --force (it was a Keras traceback from set_weights), the run left as it was."""
    import hashlib

    import numpy as np
    with np.load(SMALL_NPZ) as z:
        arrays = {k: z[k][:300] for k in z.files}
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, **{k: (np.repeat(v[..., None], 3, -1) if k.startswith("x") else v) for k, v in arrays.items()})
    cfg = ("name: r\nmodel: {name: seed_cnn}\ntrain: {steps: 2, verbose: false}\nsearch: {optimizer: tpe, trials: 1,"
           " trial_steps: 1}\nlearner: {name: weight_sparsity, fine_tune: {steps: 1, verbose: false}}\n")
    first = run(tmp_path, f"data: {{name: npz, path: {rgb}, val_split: 0.1}}\n" + cfg)
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "runs" / "r"
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    again = run(tmp_path, f"data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1}}\n" + cfg, "--resume")
    assert_one_line_error(again, "--resume", "another model or data shape", "--force")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()} == before
