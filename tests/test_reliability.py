"""Crash safety and concurrency with real processes and real studies (SQLite; PostgreSQL in CI).

A run is killed with SIGKILL at named points (`POCKETFLOW_KILL_AT`, see pocketflow/faults.py):
at the start of a trial, after a trial trained but before it was recorded, and in the final
export after every file was written but before `best/` was swapped in. `--resume` must then
finish the budget with every earlier finished trial unchanged and a loadable `best/`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_NPZ, run_cli, wait_for

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
        "target: {metric: compression, ratio: 4}\n"
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
    proc = subprocess.Popen([sys.executable, "-m", "pocketflow", "run", str(cfg), "--output", str(tmp_path / "runs")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
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
    return study


def test_four_workers_share_one_sqlite_study(seed_model, tmp_path):
    _four_workers(seed_model, tmp_path, f"sqlite:///{tmp_path / 'shared.db'}", "four_sqlite")


@pytest.mark.skipif(not PG_URL, reason="no PostgreSQL server: set POCKETFLOW_TEST_PG_URL (scripts/test.sh "
                                       "starts one with scripts/postgres.sh)")
def test_four_workers_share_one_postgresql_study(seed_model, tmp_path):
    name = f"four_pg_{uuid.uuid4().hex[:8]}"  # the server outlives the test: a fresh study each time
    _four_workers(seed_model, tmp_path, PG_URL, name)
