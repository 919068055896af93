"""Data-parallel training under a real `horovodrun` (Gloo, 2 ranks on this CPU, no mocks).

This module is also the worker those jobs start: `python tests/test_horovod.py OUT_DIR`
fine-tunes the seed CNN for a fixed number of steps and saves each rank's final weights and
logs to OUT_DIR/rank{r}.npz. Run without horovodrun it is the single-process reference.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL_NPZ = ROOT / "tests" / "data" / "fashion_mnist_small.npz"
HOROVODRUN = shutil.which("horovodrun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
DIE_ENV = "POCKETFLOW_TEST_DIE_AFTER"  # rank 1 of the worker exits abruptly after this many steps

# 1000 images -> 900 train: 14 batches of 64 and a short last one of 4 (2 per rank), so the
# 30 steps of 2 epochs cover an epoch boundary and the short batch, like real training.
WORKER_DATA = {"name": "npz", "path": str(SMALL_NPZ), "limit_train": 1000, "val_split": 0.1}
# SGD, not Adam: Adam divides by sqrt(v), which turns 1e-9 rounding in near-zero gradients
# into full-size steps of either sign, so two exact-in-theory runs need not stay close.
WORKER_TRAIN = {"epochs": 2, "batch_size": 64, "optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9,
                "schedule": "cosine", "scale_lr": False, "verbose": False}

pytestmark = [pytest.mark.horovod,
              pytest.mark.skipif(HOROVODRUN is None, reason="horovodrun not installed (scripts/setup.sh builds it)")]


def horovodrun(*cmd, cwd=ROOT, env=None, timeout=180) -> subprocess.CompletedProcess:
    """`horovodrun -np 2 -H localhost:2 --gloo CMD`, output captured (each line prefixed `[rank]<stream>:`)."""
    e = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run([HOROVODRUN, "-np", "2", "-H", "localhost:2", "--gloo", *map(str, cmd)], cwd=cwd,
                          env=e, capture_output=True, text=True, timeout=timeout)


def _worker(out_dir: Path) -> None:
    from pocketflow.distributed import world
    w = world()  # first, before TensorFlow runs an op: it pins the threads per rank
    import keras

    from pocketflow.data import load_dataset
    from pocketflow.training import TrainHook, Trainer
    from pocketflow.zoo import build_model

    class DieAfter(TrainHook):
        def __init__(self, steps):
            self.steps = steps

        def after_step(self, step):
            if w.rank == 1 and step >= self.steps:
                print(f"rank 1: dying after step {step}", flush=True)
                os._exit(1)

    class Diverge(TrainHook):
        """Rank 1 starts from other weights, momentum slots and step counter: the broadcast
        at the start of fit must replace all of them, or the ranks' weights differ."""

        def on_train_begin(self, trainer):
            if w.rank == 1:
                for v in trainer.model.trainable_variables + trainer.optimizer.variables:
                    v.assign(v + (7 if "iteration" in v.path else 0.1))

    class CountTraces(TrainHook):
        """`loss` is Python inside the tf.function step: it runs once per trace."""
        traces = 0

        def loss(self, x, y, logits):
            self.traces += 1

    keras.utils.set_random_seed(0)
    data = load_dataset(WORKER_DATA)
    model = build_model("seed_cnn", data.input_shape, data.num_classes)
    counter = CountTraces()
    hooks = [counter, Diverge()] + ([DieAfter(int(os.environ[DIE_ENV]))] if DIE_ENV in os.environ else [])
    hist = Trainer(model, data, WORKER_TRAIN, hooks=hooks, seed=0).fit()
    logs = np.array([[e["loss"], e["acc"], e["val_acc"]] for e in hist.epochs])
    # BatchNormalization statistics come from each rank's own shard: the trainer averages them
    bn = keras.Sequential([keras.Input(data.input_shape), keras.layers.Conv2D(4, 3),
                           keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
                           keras.layers.Dense(data.num_classes)])
    Trainer(bn, data, {**WORKER_TRAIN, "steps": 5}, seed=0).fit()
    bn_stats = np.concatenate([v.numpy().ravel() for v in bn.non_trainable_variables])
    # a learner's fine-tune: weight masks (sparsity) and EMA activation ranges (8-bit QAT) must
    # stay identical on every rank, like the weights
    from pocketflow.config import load_config
    from pocketflow.learners import LEARNERS, Budget
    section = load_config({"data": {"name": "mnist"}, "model": {"name": "seed_cnn"}, "learner": {
        "name": "chain", "steps": ["weight_sparsity", "uniform_quant"],
        "fine_tune": {k: v for k, v in WORKER_TRAIN.items() if k != "epochs"}}})["learner"]
    learner = LEARNERS.get("chain")(section, seed=0)
    comp = learner.compress(model, learner.default_params(model), data, Budget(steps=8))
    learned = {"learner|" + v.path.replace("/", "|"): v.numpy() for v in comp.model.variables}
    np.savez(out_dir / f"rank{w.rank}.npz", *model.get_weights(), logs=logs, steps=hist.steps,
             traces=counter.traces, bn_stats=bn_stats, **learned)


def _load(path: Path):
    """(weights, per-epoch [loss, acc, val_acc], steps, traces of the train step, BN statistics)"""
    with np.load(path) as z:
        weights = [z[k] for k in sorted((k for k in z.files if k.startswith("arr_")), key=lambda k: int(k[4:]))]
        return weights, z["logs"], int(z["steps"]), int(z["traces"]), z["bn_stats"]


def _learner_vars(path: Path) -> dict:
    """Every variable of the chain learner's wrapped model (weights, masks, quantizer ranges)."""
    with np.load(path) as z:
        return {k.split("|", 1)[1].replace("|", "/"): z[k] for k in z.files if k.startswith("learner|")}


def _initial_weights():
    import keras

    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(0)
    return build_model("seed_cnn", (28, 28, 1), 10).get_weights()


def test_two_ranks_match_each_other_and_a_single_process(tmp_path):
    hvd_dir, single_dir = tmp_path / "hvd", tmp_path / "single"
    hvd_dir.mkdir()
    single_dir.mkdir()
    job = horovodrun(sys.executable, __file__, hvd_dir)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    single = subprocess.run([sys.executable, __file__, single_dir], cwd=ROOT, capture_output=True, text=True,
                            timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert single.returncode == 0, single.stderr[-3000:]

    w0, logs0, steps0, traces0, bn0 = _load(hvd_dir / "rank0.npz")
    w1, logs1, steps1, traces1, bn1 = _load(hvd_dir / "rank1.npz")
    ws, logs_s, steps_s, traces_s, bn_s = _load(single_dir / "rank0.npz")
    assert steps0 == steps1 == steps_s == 30
    assert traces0 == traces1 == traces_s == 1, "the train step retraced (the short last batch?)"
    for a, b in zip(w0, w1):  # same averaged gradients, same optimizer: bit-identical
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(logs0, logs1)  # global metrics, not each rank's own
    np.testing.assert_array_equal(bn0, bn1)  # averaged at the end of the epoch
    np.testing.assert_allclose(bn0, bn_s, atol=0.05)  # close to, not equal to, global-batch statistics
    assert np.abs(bn0[:4]).max() > 1e-3, "BN moving means did not move"
    start = _initial_weights()
    assert max(np.abs(a - b).max() for a, b in zip(ws, start)) > 1e-2, "the reference run did not train"
    for a, b in zip(w0, ws):  # the same update as one process with the global batch
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logs0[:, :2], logs_s[:, :2], atol=1e-4)  # loss, train accuracy
    np.testing.assert_allclose(logs0[:, 2], logs_s[:, 2], atol=2e-3)  # val accuracy: at most 1 of 100 flips

    # weight_sparsity + uniform_quant fine-tune: weights, masks and EMA ranges identical on both ranks
    lv0, lv1 = _learner_vars(hvd_dir / "rank0.npz"), _learner_vars(hvd_dir / "rank1.npz")
    masks = [k for k in lv0 if k.endswith("/mask")]
    ranges = [k for k in lv0 if k.endswith(("/min", "/max"))]
    assert masks and ranges and lv0.keys() == lv1.keys(), sorted(lv0)
    for k in lv0:
        np.testing.assert_array_equal(lv0[k], lv1[k], err_msg=k)
    assert all(lv0[k].min() == 0 for k in masks), "no weight was masked"
    assert all(lv0[k] > 0 for k in ranges if k.endswith("/max")), "the activation ranges never moved"


def test_a_dying_rank_ends_the_whole_job(tmp_path):
    t0 = time.monotonic()
    job = horovodrun(sys.executable, __file__, tmp_path, env={DIE_ENV: "5"}, timeout=120)
    elapsed = time.monotonic() - t0
    out = job.stdout + job.stderr
    assert job.returncode != 0, out[-3000:]
    assert "rank 1: dying after step 5" in out
    # horovodrun's own words: it kills the surviving rank and names the first to fail
    assert "Terminating remaining workers after failure of Process 1" in out, out[-3000:]
    assert re.search(r"first process to do so was:\s*Process name: 1\s*Exit code: 1", out), out[-3000:]
    assert not list(tmp_path.glob("rank*.npz")), "a rank finished training without its peer"
    assert elapsed < 90, f"horovodrun took {elapsed:.0f}s to notice the dead rank"


def _run_config(tmp_path, **extra) -> Path:
    import yaml
    cfg = {"name": "hvd", "seed": 0,
           "data": {"name": "npz", "path": str(SMALL_NPZ), "limit_train": 1000, "limit_test": 200},
           "model": {"name": "seed_cnn"},
           "train": {"epochs": 2, "batch_size": 64, "learning_rate": 2e-3},
           "learner": {"name": "full_precision", "fine_tune": {"epochs": 1, "batch_size": 64}},
           "export": {"formats": ["keras"], "verify": False},
           "output": {"dir": str(tmp_path / "runs")}, **extra}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check_one_run(tmp_path, job) -> Path:
    """Exit 0, one run directory with a loadable best model, progress printed by rank 0 only."""
    import keras
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["hvd"], runs
    keras.saving.load_model(runs[0] / "best" / "model.keras", compile=False)
    progress = [ln for ln in job.stdout.splitlines() if re.search(r"epoch \d+/\d+: loss", ln)]
    assert progress, job.stdout[-3000:]
    assert all(ln.startswith("[0]") for ln in progress), progress
    # the other ranks print nothing but errors: no line of theirs on stdout
    assert not [ln for ln in job.stdout.splitlines() if ln.startswith("[1]<stdout>")], job.stdout[-3000:]
    assert sum("best checkpoint:" in ln for ln in job.stdout.splitlines()) == 1, job.stdout[-3000:]
    return runs[0]


def test_cli_run_under_horovodrun_writes_one_run(tmp_path):
    job = horovodrun(sys.executable, "-m", "pocketflow", "run", _run_config(tmp_path), timeout=240)
    _check_one_run(tmp_path, job)


def test_search_under_horovodrun_writes_one_study(tmp_path):
    cfg = _run_config(tmp_path, search={"optimizer": "random", "trials": 2, "trial_steps": 10,
                                        "pruner": "none"})
    job = horovodrun(sys.executable, "-m", "pocketflow", "run", cfg, timeout=300)
    run = _check_one_run(tmp_path, job)
    import optuna
    studies = list(tmp_path.rglob("*.db"))
    assert studies == [run / "study.db"], studies
    trials = optuna.load_study(study_name="hvd", storage=f"sqlite:///{studies[0]}").trials
    assert len(trials) == 2, "rank 1 ran trials of its own"  # rank 0 alone asks the study


def test_a_rank_dying_mid_search_keeps_the_finished_trials(tmp_path):
    """Rank 1 is SIGKILLed when it starts the 2nd trial: the job exits non-zero naming it, and
    the study still holds trial 0 as finished (the lost trial is re-run on --resume)."""
    import optuna
    cfg = _run_config(tmp_path, search={"optimizer": "random", "trials": 3, "trial_steps": 5, "pruner": "none"})
    py = f"{sys.executable} -m pocketflow run {cfg}"
    script = f'if [ "$HOROVOD_RANK" = 1 ]; then export POCKETFLOW_KILL_AT=trial:2; fi; exec {py}'
    job = horovodrun("sh", "-c", script, timeout=300)
    out = job.stdout + job.stderr
    assert job.returncode != 0, out[-3000:]
    assert "Terminating remaining workers after failure of Process 1" in out, out[-3000:]
    study = optuna.load_study(study_name="hvd", storage=f"sqlite:///{tmp_path / 'runs' / 'hvd' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    # trial 1 was running when rank 1 died: left RUNNING, or failed by rank 0 before it was stopped
    assert len(states) == 2 and states[0] == "COMPLETE" and states[1] in ("RUNNING", "FAIL"), states
    assert "val_acc" in study.trials[0].user_attrs
    assert not (tmp_path / "runs" / "hvd" / "best").exists()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
