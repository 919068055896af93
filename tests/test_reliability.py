"""Crash safety and concurrency with real processes and real studies (SQLite; PostgreSQL in CI).

A run is killed with SIGKILL at named points (`POCKETFLOW_KILL_AT`, see pocketflow/faults.py):
at the start of a trial, after a trial trained but before it was recorded, and in the final
export after every file was written but before `best/` was swapped in. `--resume` must then
finish the budget with every earlier finished trial unchanged and a loadable `best/`.
The run directory: --force keeps the old run until the new one has finished, one process owns
a run directory at a time, and every file gets the mode the user's umask gives.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import ROOT, SMALL_NPZ, assert_one_line_error, run_cli, wait_for

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

PG_URL = os.environ.get("POCKETFLOW_TEST_PG_URL")
TRIALS = 4


@pytest.fixture(scope="module")
def seed_model(trained_seed_cnn, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "seed_cnn.keras"
    trained_seed_cnn.save(path)
    return path


def config(path: Path, name: str, model: Path, trials: int = TRIALS, storage: str | None = None,
           steps: int = 5) -> Path:
    storage_kw = f", storage: '{storage}', study_name: {name}" if storage else ""
    path.write_text(
        f"name: {name}\nseed: 0\n"
        f"data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1, limit_train: 800}}\n"
        f"model: {{name: {model}}}\n"
        "learner: {name: weight_sparsity, fine_tune: {epochs: 1, steps: 5, batch_size: 64, verbose: false}}\n"
        "target: {metric: packed_size, ratio: 4}\n"
        f"search: {{optimizer: random, trials: {trials}, trial_steps: {steps}, pruner: none{storage_kw}}}\n"
        "export: {formats: [keras, tflite], verify: false}\n")
    return path


def study_of(run_dir: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")


def finished(study) -> dict:
    return {t.number: (t.state, t.params, t.value, t.datetime_complete)
            for t in study.get_trials() if t.state.is_finished() and not t.user_attrs.get("void")}


def assert_best_loads(run_dir: Path):
    import keras
    model = keras.saving.load_model(run_dir / "best" / "model.keras", compile=False)
    assert model.count_params() > 0
    assert (run_dir / "best" / "model.tflite").stat().st_size > 0
    assert (run_dir / "best" / "metrics.json").is_file()
    assert not list(run_dir.glob("*.tmp*")) and not list((run_dir / "best").glob("*.tmp*"))


@pytest.mark.parametrize("point, finished_before", [("trial:3", 2), ("trial_eval:2", 1), ("final_export:1", TRIALS)])
def test_sigkill_then_resume_keeps_finished_trials(seed_model, tmp_path, point, finished_before):
    name = "k" + point.split(":")[0].replace("_", "")
    cfg = config(tmp_path / "c.yaml", name, seed_model)
    run_dir = tmp_path / "runs" / name
    killed = run_cli("run", cfg, "--output", tmp_path / "runs", env={"POCKETFLOW_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = finished(study_of(run_dir, name))
    assert len(before) == finished_before
    if (run_dir / "best").exists():  # never a half-written best/
        assert_best_loads(run_dir)

    resumed = run_cli("run", cfg, "--output", tmp_path / "runs", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    study = study_of(run_dir, name)
    after = finished(study)
    for n, rec in before.items():  # kept as they were: not re-run, not changed
        assert after[n] == rec
    assert len(after) == TRIALS  # the budget counts finished trials, the killed one was redone
    assert all(t.state.name != "RUNNING" for t in study.get_trials())
    assert_best_loads(run_dir)
    assert not (run_dir / "best.staging").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_marks_the_running_trial_and_resume_finishes(seed_model, tmp_path, sig):
    name = f"stop{sig.name.lower()}"
    cfg = config(tmp_path / "c.yaml", name, seed_model, trials=3, steps=400)
    run_dir = tmp_path / "runs" / name
    log = open(tmp_path / "log.txt", "w")
    # started with SIGINT ignored, as `pocketflow run ... &` from a script (or this suite run in the
    # background) starts it: Ctrl-C must still stop it
    proc = subprocess.Popen([sys.executable, "-m", "pocketflow", "run", str(cfg), "--output", str(tmp_path / "runs")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until a trial is running
            if (run_dir / "study.db").exists():
                try:
                    if any(t.state.name == "RUNNING" for t in study_of(run_dir, name).get_trials()):
                        break
                except Exception:  # the study is being created
                    pass
            time.sleep(0.5)
        else:
            pytest.fail("no trial started: " + (tmp_path / "log.txt").read_text()[-2000:])
        time.sleep(1.0)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "log.txt").read_text()
    assert "pocketflow: interrupted" in out and "Traceback" not in out
    stopped = [t for t in study_of(run_dir, name).get_trials() if t.user_attrs.get("void") == "interrupted"]
    assert len(stopped) == 1 and stopped[0].state.name == "FAIL"
    assert "stopped by the user" in stopped[0].user_attrs["fail_reason"]
    resumed = run_cli("run", cfg, "--output", tmp_path / "runs", "--resume", "--set", "search.trial_steps=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(finished(study_of(run_dir, name))) == 3
    assert_best_loads(run_dir)


def _start_run(cfg: Path, output: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pocketflow", "run", str(cfg), "--output", str(output)],
                            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_one_process_owns_a_run_directory(seed_model, tmp_path):
    """A second `run` on a run directory in use is refused in one line naming the owner, whatever
    its flags; the lock dies with its owner (SIGKILL) and --resume then finishes the run."""
    name = "owned"
    cfg = config(tmp_path / "c.yaml", name, seed_model, trials=2, steps=400)
    run_dir = tmp_path / "runs" / name
    first = _start_run(cfg, tmp_path / "runs", tmp_path / "first.log")
    try:
        wait_for(lambda: any(t.state.name == "RUNNING" for t in study_of(run_dir, name).get_trials()),
                 timeout=300, what="a running trial")
        os.kill(first.pid, signal.SIGSTOP)  # held mid-trial (it still owns the directory) however fast it is
        for flags in (["--resume"], ["--force"]):
            second = run_cli("run", cfg, "--output", tmp_path / "runs", *flags)
            assert_one_line_error(second, str(run_dir), "in use by another pocketflow process", f"pid {first.pid}")
        assert first.poll() is None and (run_dir / "config.yaml").is_file()  # the owner's run, untouched
        assert not (run_dir.parent / ".owned.replaced").exists()
    finally:
        first.kill()
        first.wait()
    resumed = run_cli("run", cfg, "--output", tmp_path / "runs", "--resume", "--set", "search.trial_steps=5")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(finished(study_of(run_dir, name))) == 2


# -- --force keeps the old run until the new one has finished --------------------------------------

KEEP = (f"name: keep\nseed: 0\ndata: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1, limit_train: 600}}\n"
        "model: {name: seed_cnn}\ntrain: {epochs: 1, batch_size: 64, verbose: false}\n"
        "learner: {name: full_precision, fine_tune: {epochs: 0, verbose: false}}\nsearch: {optimizer: none}\n"
        "export: {formats: [keras, tflite], verify: false}\n")
NAN_SEARCH = KEEP.replace(  # trains the baseline, then every trial fails as NaN: the run fails
    "learner: {name: full_precision, fine_tune: {epochs: 0, verbose: false}}\nsearch: {optimizer: none}\n",
    "learner: {name: weight_sparsity, fine_tune: {optimizer: sgd, learning_rate: 1.0e+30, verbose: false}}\n"
    "target: {ratio: 2}\nsearch: {optimizer: random, trials: 1, pruner: none, trial_steps: 5}\n")


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory) -> Path:
    """A finished run to be replaced; each test works on its own copy."""
    tmp = tmp_path_factory.mktemp("kept")
    (tmp / "c.yaml").write_text(KEEP)
    proc = run_cli("run", tmp / "c.yaml", "--output", tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "runs" / "keep"


def tree(d: Path) -> dict:
    """Every file and directory under `d`: its mode and (files) the hash of its bytes."""
    return {str(p.relative_to(d)): (stat.filemode(p.stat().st_mode),
                                    hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None)
            for p in sorted(d.rglob("*"))}


def _copy(run: Path, tmp_path: Path, text: str = KEEP) -> tuple[Path, Path, dict]:
    shutil.copytree(run, tmp_path / "runs" / run.name)
    (tmp_path / "c.yaml").write_text(text)
    return tmp_path / "c.yaml", tmp_path / "runs" / run.name, tree(tmp_path / "runs" / run.name)


def _rgb_data(path: Path) -> Path:
    import numpy as np
    d = dict(np.load(SMALL_NPZ))
    np.savez(path, **{k: np.repeat(v[..., None], 3, axis=-1) if k.startswith("x") else v for k, v in d.items()})
    return path


@pytest.mark.parametrize("case", ["unreachable target", "corrupt model", "unreadable data", "data the model cannot take"])
def test_refused_force_keeps_the_old_run(kept_run, seed_model, tmp_path, case):
    (tmp_path / "bad.keras").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "bad.npz").write_bytes(b"not a zip at all")
    flags, pieces = {
        "unreachable target": (["--set", "learner.name=uniform_quant", "--target-ratio", "40"], ["out of reach"]),
        "corrupt model": (["--set", f"model.name={tmp_path / 'bad.keras'}"], ["bad.keras", "corrupt"]),
        "unreadable data": (["--set", f"data.path={tmp_path / 'bad.npz'}"], ["bad.npz", "not a readable .npz"]),
        "data the model cannot take": (["--set", f"model.name={seed_model}", "--set", "model.pretrained=true",
                                        "--set", f"data.path={_rgb_data(tmp_path / 'rgb.npz')}"], []),
    }[case]
    cfg, run_dir, before = _copy(kept_run, tmp_path)
    assert_one_line_error(run_cli("run", cfg, "--output", tmp_path / "runs", "--force", *flags), *pieces)
    assert tree(run_dir) == before
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [".keep.lock", "keep"]


def test_force_failing_after_training_started_puts_the_old_run_back(kept_run, tmp_path):
    cfg, run_dir, before = _copy(kept_run, tmp_path, NAN_SEARCH)
    proc = run_cli("run", cfg, "--output", tmp_path / "runs", "--force")
    assert_one_line_error(proc, "no trial", "nan")
    assert "baseline: training" in proc.stdout  # it failed after it had started writing the new run
    assert tree(run_dir) == before
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [".keep.lock", "keep"]


@pytest.mark.parametrize("point, kept", [("final_export:1", "old"), ("run_finished:1", "new")])
def test_force_killed_is_settled_by_the_next_start(kept_run, tmp_path, point, kept):
    """SIGKILL during a --force run (before best/ of the new run was swapped in: the old run comes
    back; after the new run finished but before the old was deleted: the new one stays)."""
    cfg, run_dir, before = _copy(kept_run, tmp_path)
    killed = run_cli("run", cfg, "--output", tmp_path / "runs", "--force", env={"POCKETFLOW_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "runs" / ".keep.replaced").is_dir()  # the old run, still whole
    again = run_cli("run", cfg, "--output", tmp_path / "runs")
    assert_one_line_error(again, "already exists")
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [".keep.lock", "keep"]
    if kept == "old":
        assert "put back the previous run" in again.stdout
        assert tree(run_dir) == before
    else:
        assert tree(run_dir) != before
        assert_best_loads(run_dir)


def test_force_that_finishes_replaces_the_old_run(kept_run, tmp_path):
    cfg, run_dir, before = _copy(kept_run, tmp_path)
    proc = run_cli("run", cfg, "--output", tmp_path / "runs", "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert tree(run_dir) != before
    assert sorted(p.name for p in run_dir.parent.iterdir()) == [".keep.lock", "keep"]
    assert_best_loads(run_dir)


# -- file modes ----------------------------------------------------------------------------------------

def _with_umask(mask: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pocketflow", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, preexec_fn=lambda: os.umask(mask))


def _modes(d: Path) -> dict:
    return {str(p.relative_to(d)): stat.S_IMODE(p.stat().st_mode) for p in sorted(d.rglob("*"))}


def test_run_files_get_the_umask_mode(tmp_path):
    """Atomic writes (temp file + rename) and the best/ staging dir end up as a plain open() or
    mkdir() would make them (0666 / 0777 less the umask), not private 0600 / 0700."""
    (tmp_path / "c.yaml").write_text(KEEP)
    proc = _with_umask(0o027, "run", tmp_path / "c.yaml", "--output", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    modes = _modes(tmp_path / "runs")
    assert "keep/best/metrics.json" in modes and "keep/baseline/model.keras" in modes
    for rel, mode in modes.items():
        want = 0o750 if (tmp_path / "runs" / rel).is_dir() else 0o640
        assert mode == want, (rel, oct(mode))


@pytest.mark.parametrize("mask", [0o002, 0o077])
def test_export_files_get_the_umask_mode(seed_model, tmp_path, mask):
    proc = _with_umask(mask, "export", seed_model, "--format", "keras", "--format", "tflite", "--output", tmp_path / "e")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _modes(tmp_path / "e") == {"seed_cnn.keras": 0o666 & ~mask, "seed_cnn.tflite": 0o666 & ~mask}


def _four_workers(seed_model, tmp_path, storage: str, name: str):
    cfg = config(tmp_path / "c.yaml", name, seed_model, trials=8, storage=storage, steps=40)
    procs = []
    for i in range(4):
        log = open(tmp_path / f"w{i}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "pocketflow", "run", str(cfg), "--output", str(tmp_path / f"w{i}")],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    try:
        # all four start at once (the schema-creation race); the first to run a trial is held until
        # another has one, or on a loaded machine it may finish the budget while the rest import TF
        pid = lambda t: t.user_attrs.get("worker", {}).get("pid")  # noqa: E731
        trials = lambda: optuna.load_study(study_name=name, storage=storage).get_trials()  # noqa: E731
        first = wait_for(lambda: next((pid(t) for t in trials() if pid(t)), None), timeout=600,
                         what="a first trial")
        os.kill(first, signal.SIGSTOP)
        try:
            wait_for(lambda: any(pid(t) not in (None, first) for t in trials()), timeout=600,
                     what="a second worker's trial")
        finally:
            os.kill(first, signal.SIGCONT)
        for i, p in enumerate(procs):
            assert p.wait(timeout=900) == 0, (tmp_path / f"w{i}.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials()
    done = [t for t in trials if t.state.is_finished() and not t.user_attrs.get("void")]
    assert len(done) == 8, [(t.number, t.state.name, t.user_attrs.get("void")) for t in trials]
    assert len({t.number for t in trials}) == len(trials)  # no duplicate trial numbers
    assert all(t.state.name == "COMPLETE" for t in done)
    assert all(t.state.name != "RUNNING" for t in trials)
    workers = {t.user_attrs["worker"]["pid"] for t in done}
    assert len(workers) >= 2, "the workers did not share the study"
    for i in range(4):
        assert (tmp_path / f"w{i}" / name / "best" / "model.keras").is_file()
    secret = urlsplit(storage).password
    if secret:  # the storage URL's password is masked everywhere a worker writes or prints
        for f in [p for p in tmp_path.rglob("*") if p.is_file() and p != tmp_path / "c.yaml"]:
            assert secret.encode() not in f.read_bytes(), f
    return study


def test_four_workers_share_one_sqlite_study(seed_model, tmp_path):
    _four_workers(seed_model, tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", "four_sqlite")


@pytest.mark.skipif(not PG_URL, reason="no PostgreSQL server: set POCKETFLOW_TEST_PG_URL (scripts/test.sh "
                                       "starts one with scripts/postgres.sh)")
def test_four_workers_share_one_postgresql_study(seed_model, tmp_path):
    name = f"four_pg_{uuid.uuid4().hex[:8]}"  # the server outlives the test: a fresh study each time
    _four_workers(seed_model, tmp_path, PG_URL, name)


STOPPER = '''
import os, signal
import keras


def build(input_shape, num_classes):
    try:  # a stop signal while a library runs our code: it re-raises the interrupt as its own error
        os.kill(os.getpid(), signal.SIGTERM)
    except KeyboardInterrupt:
        raise TypeError("Failed to convert elements of (None, 2028) to Tensor")
    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(num_classes)])
'''


def test_a_stop_signal_that_a_library_turned_into_its_own_error_is_still_a_stop(tmp_path):
    """Seen in CI: SIGTERM while TensorFlow traced a predict function came out as a TypeError and
    a traceback (exit 1). After a stop signal, any error is the stop: one line, exit 130."""
    (tmp_path / "stopper.py").write_text(STOPPER)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: npz, path: {SMALL_NPZ}}}\nmodel: {{name: 'stopper:build'}}\n")
    proc = run_cli("run", cfg, "--output", tmp_path / "runs", cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "pocketflow: interrupted" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
