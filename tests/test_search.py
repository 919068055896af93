"""The outer search as a user runs it: YAML -> `pocketflow run` -> a real SQLite Optuna study.

No mocks: every test reads the study the CLI wrote. A ratio-bearing learner (weight_sparsity,
else channel_pruning) is used when registered; the seed CNN is trained once and loaded as a
.keras file so every process (workers, resumed runs) starts from the same teacher.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_NPZ, run_cli, wait_for

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

from pocketflow.learners import LEARNERS  # noqa: E402

RATIO_LEARNER = next((n for n in ("weight_sparsity", "channel_pruning") if n in LEARNERS), None)
TARGET = {"weight_sparsity": ("packed_size", 4.0), "channel_pruning": ("flops", 2.0)}.get(RATIO_LEARNER)
needs_ratio = pytest.mark.skipif(RATIO_LEARNER is None, reason="no ratio-bearing learner (weight_sparsity or "
                                 "channel_pruning) is registered yet")


@pytest.fixture(scope="module")
def seed_model(trained_seed_cnn, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "seed_cnn.keras"
    trained_seed_cnn.save(path)
    return path


def write_config(path: Path, name: str, model: Path, optimizer: str, trials: int, steps: int,
                 storage: str | None = None, ratio: float | None = None) -> Path:
    learner = RATIO_LEARNER or "full_precision"
    metric, default_ratio = TARGET or ("packed_size", None)
    ratio = default_ratio if ratio is None else ratio
    lines = [f"name: {name}", "seed: 0",
             f"data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1}}",
             f"model: {{name: {model}}}",
             f"learner: {{name: {learner}, fine_tune: {{epochs: 1, steps: 5, batch_size: 64, verbose: false}}}}",
             f"search: {{optimizer: {optimizer}, trials: {trials}, trial_steps: {steps}, pruner: none"
             + (f", storage: '{storage}'" if storage else "") + "}",
             "export: {formats: [keras], verify: false}"]
    if ratio is not None:
        lines.append(f"target: {{metric: {metric}, ratio: {ratio}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def load(db: Path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}")


def counted(study):
    """Finished trials that hold a budget slot (not interrupted/surplus)."""
    from pocketflow.hpo.study import holds_slot, is_finished
    return [t for t in study.get_trials() if holds_slot(t) and is_finished(t)]


# -- one run per optimizer, shared by the checks below ---------------------------------------------

OPTIMIZERS = ("gp", "tpe", "random")


@pytest.fixture(scope="module")
def runs(seed_model, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor
    out = tmp_path_factory.mktemp("runs")
    cfgs = {opt: write_config(out / f"{opt}.yaml", f"s_{opt}", seed_model, opt, trials=3, steps=10)
            for opt in OPTIMIZERS}
    # three independent runs (own run directory and study): concurrent, as most of each is start-up
    with ThreadPoolExecutor(len(OPTIMIZERS)) as pool:
        procs = {opt: pool.submit(run_cli, "run", cfg, "--output", out) for opt, cfg in cfgs.items()}
        return {opt: (out / f"s_{opt}", f.result()) for opt, f in procs.items()}


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_optimizer_runs_end_to_end_from_yaml(runs, opt):
    run_dir, proc = runs[opt]
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(run_dir / "study.db", f"s_{opt}")
    trials = counted(study)
    assert len(trials) == 3 and len({t.number for t in trials}) == 3
    assert proc.stdout.count(" | best ") == 3  # a progress line per trial, with the best so far
    metrics = json.loads((run_dir / "best" / "metrics.json").read_text())
    s = metrics["search"]
    assert s["optimizer"]["name"] == opt and s["n_trials"] == 3
    best = max((t for t in trials if t.state.name == "COMPLETE" and all(c <= 0 for c in t.constraints.values())),
               key=lambda t: t.value)
    assert s["best_trial"] == best.number and metrics["params"] == best.user_attrs["projected"]
    assert 0 <= s["search_overhead_seconds"] <= s["wall_seconds"]
    for t in trials:  # raw and projected points, and the measurements, are in the study
        assert {"params", "projected", "val_acc", "ratio", "seconds"} <= set(t.user_attrs), t.user_attrs


@needs_ratio
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_every_trial_meets_the_target(runs, opt):
    run_dir, proc = runs[opt]
    assert proc.returncode == 0, proc.stderr[-3000:]
    metric, ratio = TARGET
    for t in counted(load(run_dir / "study.db", f"s_{opt}")):
        assert t.state.name == "COMPLETE", (t.number, t.state, t.user_attrs.get("fail_reason"))
        assert t.user_attrs["metric"] == metric
        assert t.user_attrs["ratio"] >= ratio * 0.99, (t.number, t.user_attrs["ratio"])
        assert t.user_attrs["feasible"] and t.constraints["ratio"] <= 0


def test_report_has_plots_and_real_trials(runs):
    run_dir, proc = runs["tpe"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run_dir / "report.md").read_text()
    for png in ("tradeoff.png", "progress.png"):
        assert f"]({png})" in report
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if RATIO_LEARNER:  # per-layer settings of the best point
        assert "](best_layers.png)" in report and (run_dir / "best_layers.png").stat().st_size > 1000
    study = load(run_dir / "study.db", "s_tpe")
    for t in counted(study):
        assert f"| {t.number} | complete" in report and f"{t.user_attrs['val_acc']:.4f}" in report
    best = json.loads((run_dir / "best" / "metrics.json").read_text())["search"]["best_trial"]
    assert f"- best: trial {best}," in report


def test_best_prints_the_checkpoint(runs):
    run_dir, _ = runs["gp"]
    proc = run_cli("best", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint: {run_dir / 'best' / 'model.keras'}" in proc.stdout
    assert "best trial: #" in proc.stdout


def test_unreachable_target_is_refused_in_one_line(seed_model, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", "far", seed_model, "tpe", trials=2, steps=5, ratio=1000.0)
    proc = run_cli("run", cfg, "--output", tmp_path / "runs")
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("pocketflow: error: "), proc.stderr
    assert "out of reach" in lines[0] and "maximum" in lines[0] and "Traceback" not in proc.stderr


# -- sharing and surviving ---------------------------------------------------------------------------

def popen(*args, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "pocketflow", *map(str, args)], cwd=ROOT,
                            stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))


def test_two_workers_share_the_budget(seed_model, tmp_path):
    """Two processes, separate output directories, one storage URL: N trials in total."""
    db = tmp_path / "study.db"
    url = f"sqlite:///{db}"
    cfg = write_config(tmp_path / "par.yaml", "par", seed_model, "tpe", trials=6, steps=120, storage=url)
    first = popen("run", cfg, "--output", tmp_path / "a", log=tmp_path / "a.log")
    try:
        wait_for(lambda: any(t.state.name == "RUNNING" for t in load(db, "par").get_trials()),
                 what="the first worker's first trial")
        # hold the first worker until the second has joined, or on a loaded machine the first
        # may finish the budget while the second is still importing TensorFlow
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = popen("run", cfg, "--output", tmp_path / "b", log=tmp_path / "b.log")
            wait_for(lambda: any(t.state.name == "RUNNING" and t.user_attrs.get("worker", {}).get("pid") == second.pid
                                 for t in load(db, "par").get_trials()), timeout=600,
                     what="the second worker's first trial")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert second.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-3000:]
        assert first.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        for p in (first, locals().get("second")):
            if p is not None and p.poll() is None:
                p.kill()
    study = load(db, "par")
    trials = counted(study)
    assert len(trials) == 6
    assert len({t.number for t in trials}) == 6
    points = {json.dumps(t.params, sort_keys=True) for t in trials}
    assert len(points) == 6, "two trials ran the same point"
    assert all(t.state.name != "RUNNING" for t in study.get_trials())
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2, f"one worker did all the trials: {pids}"
    for d in ("a", "b"):
        assert (tmp_path / d / "par" / "best" / "model.keras").is_file()


def test_killed_run_resumes_keeping_finished_trials(seed_model, tmp_path):
    cfg = write_config(tmp_path / "k.yaml", "kill", seed_model, "random", trials=4, steps=150)
    db = tmp_path / "runs" / "kill" / "study.db"
    proc = popen("run", cfg, "--output", tmp_path / "runs", log=tmp_path / "k.log")
    try:
        def mid_trial():
            ts = load(db, "kill").get_trials()
            running = [t for t in ts if t.state.name == "RUNNING" and "worker" in t.user_attrs]
            return running[0] if sum(t.state.is_finished() for t in ts) >= 2 and running else None
        victim = wait_for(mid_trial, what="a trial running after two finished ones")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = {t.number: (t.state, t.params, t.value, t.datetime_complete)
              for t in load(db, "kill").get_trials() if t.state.is_finished()}
    assert victim.number not in before
    resumed = run_cli("run", cfg, "--output", tmp_path / "runs", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trial {victim.number}: interrupted" in resumed.stdout
    study = load(db, "kill")
    after = {t.number: t for t in study.get_trials()}
    for n, (state, params, value, completed) in before.items():  # never redone, never changed
        t = after[n]
        assert (t.state, t.params, t.value, t.datetime_complete) == (state, params, value, completed)
    killed = after[victim.number]
    assert killed.state.name == "FAIL" and killed.user_attrs["void"] == "interrupted"
    assert "interrupted" in killed.user_attrs["fail_reason"]
    retry = [t for t in after.values() if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].params == victim.params and retry[0].state.is_finished()
    assert len(counted(study)) == 4


# -- the pieces, on real studies without TensorFlow work ---------------------------------------------

def test_grid_covers_every_point_once(tmp_path):
    from pocketflow.errors import PocketFlowError
    from pocketflow.hpo.optimizers import make_optimizer
    from pocketflow.hpo.space import Categorical, Float, Int
    space = {"lr": Float(1e-4, 1e-1, log=True), "bits": Categorical((4, 8))}
    opt = make_optimizer("grid", space, seed=0, trials=8)
    assert opt.capacity() == 8 and opt.grid["lr"][0] == pytest.approx(1e-4) and opt.grid["lr"][-1] == pytest.approx(0.1)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'g.db'}", study_name="g", direction="maximize",
                                sampler=opt.sampler())
    seen = []
    for _ in range(opt.capacity()):
        t = opt.ask(study)
        seen.append((t.params["lr"], t.params["bits"]))
        study.tell(t, 1.0)
    assert len(set(seen)) == 8
    with pytest.raises(PocketFlowError, match="at most 2 dimensions"):
        make_optimizer("grid", {**space, "k": Int(1, 3)}, seed=0, trials=8)


def test_gp_is_rebuilt_from_the_study(tmp_path):
    """A resumed GP learns every finished trial from the study, and proposes inside the space."""
    from pocketflow.hpo.optimizers import make_optimizer
    from pocketflow.hpo.space import Float, Int
    space = {"lr": Float(1e-4, 1e-1, log=True), "bits": Int(2, 8)}
    url = f"sqlite:///{tmp_path / 'gp.db'}"
    first = make_optimizer("gp", space, seed=0, trials=8)
    study = optuna.create_study(storage=url, study_name="gp", direction="maximize", sampler=first.sampler())
    for _ in range(5):
        t = first.ask(study)
        study.tell(t, t.params["bits"] / 8)
    again = make_optimizer("gp", space, seed=1, trials=8)
    study = optuna.load_study(study_name="gp", storage=url, sampler=again.sampler())
    history = [(t.number, t.params, t.value) for t in study.get_trials()]
    assert again.sync(history) == 5 and again.sync(history) == 0
    t = again.ask(study)
    assert 1e-4 <= t.params["lr"] <= 1e-1 and 2 <= t.params["bits"] <= 8
    assert isinstance(t.params["bits"], int) and again.info()["observations"] == 5


def test_report_on_a_partial_study(tmp_path):
    from pocketflow.hpo.report import pareto, write_report
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'p.db'}", study_name="p", direction="maximize")
    study.set_user_attr("pocketflow", {"learner": "weight_sparsity", "metric": "packed_size", "ratio": 4.0})
    for i, (acc, ratio) in enumerate([(0.8, 4.1), (0.7, 6.0), (0.75, 3.0)]):
        t = study.ask({"sparsity/conv": optuna.distributions.FloatDistribution(0, 1)})
        t.set_user_attr("projected", {"sparsity/conv": 0.5 + i / 10, "sparsity/logits": 0.7})
        t.set_user_attr("ratio", ratio)
        t.set_constraint("ratio", (4.0 * 0.99 - ratio) / 4.0)
        study.tell(t, acc)
    study.ask()  # still running
    path = write_report(study, tmp_path)
    text = path.read_text()
    assert "trial 0, validation accuracy 0.8000" in text and "1 running" in text
    assert "(misses target)" in text  # trial 2 is under the target
    assert (tmp_path / "best_layers.png").is_file() and (tmp_path / "tradeoff.png").is_file()
    assert pareto([(4.1, 0.8, 0), (6.0, 0.7, 1), (3.0, 0.75, 2)]) == [1, 0]


# -- the dimensions every learner can search (fine_tune/learning_rate) -------------------------------

LR_LEARNERS = {"full_precision": {}, "weight_sparsity": {"sparsity": 0.5}, "uniform_quant": {"bits": 6},
               "nonuniform_quant": {"bits": 3}, "channel_pruning": {"preserve_ratio": 0.75, "latency_aware": False},
               "distillation": {"student": "seed_cnn"},
               "chain": {"steps": ["weight_sparsity", "uniform_quant"]}}


def _lr_search(seed_model, out: Path, learner: str, search: dict) -> tuple[list, dict]:
    """An in-process run with a one- or two-trial search over the learner's settings."""
    from pocketflow import api
    name = f"lr_{learner}_{len(list(out.iterdir()))}"
    cfg = {"name": name, "seed": 0, "data": {"name": "npz", "path": str(SMALL_NPZ), "val_split": 0.1},
           "model": {"name": str(seed_model)},
           "learner": {"name": learner, "fine_tune": {"epochs": 1, "steps": 1, "batch_size": 64, "verbose": False},
                       **LR_LEARNERS[learner]},
           "search": {"optimizer": "random", "trial_steps": 6, "pruner": "none", **search},
           "export": {"formats": ["keras"], "verify": False}}
    res = api.compress(cfg, output=str(out))
    return counted(load(out / name / "study.db", name)), res.metrics


@pytest.mark.parametrize("learner", list(LR_LEARNERS))
def test_every_learner_searches_the_fine_tune_learning_rate(seed_model, tmp_path, learner):
    """`search.space` switches the dimension on for every learner (it was 'unknown dimension'
    for all but full_precision), and the trial's fine-tune really trains with the value: the same
    point with a vanishing and with a large learning rate scores differently."""
    scores = {}
    for lr in (1e-12, 0.05):
        trials, _ = _lr_search(seed_model, tmp_path, learner,
                               {"trials": 1, "space": {"fine_tune/learning_rate": {"choices": [lr]}}})
        assert trials[0].state.name == "COMPLETE", trials[0].user_attrs.get("fail_reason")
        assert trials[0].params["fine_tune/learning_rate"] == lr  # a dimension the optimizer sampled
        scores[lr] = trials[0].value
    assert scores[1e-12] != scores[0.05], scores


def test_a_chain_takes_a_learning_rate_per_step(seed_model, tmp_path):
    """`<step>/fine_tune/learning_rate` is a dimension of each chain step, as hand recipes tune it."""
    from pocketflow.learners import LEARNERS
    from pocketflow.config import load_config
    from pocketflow.hpo.space import build_space
    from pocketflow.zoo import load_keras_file
    cfg = load_config({"data": {"name": "npz", "path": str(SMALL_NPZ)}, "model": {"name": "seed_cnn"},
                       "learner": {"name": "chain", "steps": ["weight_sparsity", "uniform_quant"]}})
    chain = LEARNERS.get("chain")(cfg["learner"])
    model = load_keras_file(seed_model)
    space, fixed = build_space(chain, model, {"space": {"weight_sparsity/fine_tune/learning_rate": [1e-4, 1e-2],
                                                        "uniform_quant/fine_tune/learning_rate": None}})
    assert {"weight_sparsity/fine_tune/learning_rate", "uniform_quant/fine_tune/learning_rate"} <= set(space)
    assert "fine_tune/learning_rate" not in space and not fixed
    parts = chain.split({"fine_tune/learning_rate": 1e-3, "uniform_quant/fine_tune/learning_rate": 2e-4})
    assert parts["weight_sparsity"]["fine_tune/learning_rate"] == 1e-3
    assert parts["uniform_quant"]["fine_tune/learning_rate"] == 2e-4
    with pytest.raises(Exception, match="unknown dimension 'fine_tune/learning_rat'"):
        build_space(chain, model, {"space": {"fine_tune/learning_rat": [1e-4, 1e-2]}})



def _open_study_file(url, queue):
    from pocketflow.hpo.study import open_storage
    try:
        open_storage(url, lambda storage, trial: None)
        queue.put(None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, asserted there
        queue.put(f"{type(e).__name__}: {e}")


def test_workers_opening_a_new_study_file_together_all_open_it(tmp_path):
    """Workers (or a reader such as optuna-dashboard) opening a study file that does not exist yet
    race to create its schema; the loser of SQLite's race sees "table ... already exists" or
    "UNIQUE constraint failed" on alembic's version row and must wait for the winner's tables, not
    fail the run (plain RDBStorage fails this way in most rounds)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")  # forked: optuna is already imported, all start at once
    errors = []
    for rep in range(8):
        url, queue = f"sqlite:///{tmp_path / f's{rep}.db'}", ctx.Queue()
        procs = [ctx.Process(target=_open_study_file, args=(url, queue)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        errors += [e for e in (queue.get(timeout=5) for _ in procs) if e]
    assert not errors, errors[:3]


def test_tpe_asks_a_conditional_space_define_by_run(tmp_path):
    """A `method` and each method's dimensions under its name: TPE asks the method first and then
    only its dimensions (enqueued points too); a space without one stays flat."""
    import optuna

    from pocketflow.hpo.optimizers import OPTIMIZERS
    from pocketflow.hpo.space import Categorical, Float, Int, branches
    space = {"method": Categorical(("a", "b+c")), "a/x": Float(0.0, 1.0), "a/n": Int(1, 4),
             "b+c/b/y": Float(1e-4, 1e-2, log=True), "lr": Float(0.1, 1.0)}
    assert branches(space) == {"": ["lr"], "a": ["a/x", "a/n"], "b+c": ["b+c/b/y"]}
    assert branches({"method": Categorical(("a",)), "x": Float(0, 1)}) is None
    opt = OPTIMIZERS.get("tpe")(space, seed=0, trials=12)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize",
                                sampler=opt.sampler())
    study.enqueue_trial({"method": "b+c", "b+c/b/y": 1e-3, "lr": 0.5, "a/x": 0.3})  # a recipe point
    seen = set()
    for i in range(12):
        t = opt.ask(study)
        m = t.params["method"]
        seen.add(m)
        assert set(t.params) == {"method", "lr", *branches(space)[m]}
        if i == 0:
            assert t.params == {"method": "b+c", "b+c/b/y": 1e-3, "lr": 0.5}
        study.tell(t, t.params.get("a/x", 0.2) + t.params["lr"])
    assert seen == {"a", "b+c"} and opt.info()["conditional"] is True
    flat = OPTIMIZERS.get("tpe")({"x": Float(0, 1)}, seed=0, trials=4)
    assert flat.branches is None and flat.info()["conditional"] is False
