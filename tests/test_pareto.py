"""Pareto mode as a user runs it: YAML -> `pocketflow run` -> a multi-objective study, the front's
points fine-tuned and exported to pareto/<k>/, then `pocketflow front` and `best --ratio`.

Real small data and a trained seed CNN (conftest); a sparsity+int8 chain whose download size the
search trades against accuracy. The front is checked against the study independently.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SMALL_NPZ, assert_one_line_error, run_cli, run_cli_inprocess

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def seed_model(trained_seed_cnn, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "seed_cnn.keras"
    trained_seed_cnn.save(path)
    return path


def write_config(path: Path, name: str, model: Path, optimizer: str, trials: int = 6, extra: str = "",
                 target: str = "") -> Path:
    path.write_text("\n".join([
        f"name: {name}", "seed: 0",
        f"data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1}}",
        f"model: {{name: {model}}}",
        "learner: {name: chain, steps: [weight_sparsity, uniform_quant], "
        "fine_tune: {epochs: 1, steps: 5, batch_size: 64, verbose: false}}",
        f"search: {{optimizer: {optimizer}, trials: {trials}, trial_steps: 5, objective: pareto, "
        f"objectives: [accuracy, download_size]{extra}}}",
        "export: {formats: [keras, tflite], verify: false}",
    ] + ([f"target: {{{target}}}"] if target else [])) + "\n")
    return path


RUNS = {  # optimizer -> (extra search keys, target section)
    "tpe": (", pruner: median", ""),
    "nsga2": (", pruner: none, pareto_points: 3", "metric: download_size, ratio: 8"),
    "gp": ("", ""),
}


@pytest.fixture(scope="module")
def runs(seed_model, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor
    out = tmp_path_factory.mktemp("runs")
    cfgs = {opt: write_config(out / f"{opt}.yaml", f"p_{opt}", seed_model, opt, extra=e, target=t)
            for opt, (e, t) in RUNS.items()}
    with ThreadPoolExecutor(len(cfgs)) as pool:
        procs = {opt: pool.submit(run_cli, "run", cfg, "--output", out) for opt, cfg in cfgs.items()}
        return {opt: (out / f"p_{opt}", f.result()) for opt, f in procs.items()}


def study_of(run_dir: Path):
    return optuna.load_study(study_name=run_dir.name, storage=f"sqlite:///{run_dir / 'study.db'}")


def independent_front(study) -> set[int]:
    """Feasible complete trials no other feasible trial beats in every value (first of equals)."""
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"
            and all(c <= 0 for c in t.constraints.values())]
    front, seen = set(), set()
    for t in sorted(done, key=lambda t: t.number):
        beaten = any(all(a >= b for a, b in zip(o.values, t.values)) and o.values != t.values for o in done)
        if not beaten and tuple(t.values) not in seen:
            front.add(t.number)
            seen.add(tuple(t.values))
    return front


def exported(run_dir: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in run_dir.glob("pareto/*/metrics.json")}


@pytest.mark.parametrize("opt", list(RUNS))
def test_pareto_search_exports_the_front(runs, opt):
    run_dir, proc = runs[opt]
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = study_of(run_dir)
    assert len(study.directions) == 2
    front = independent_front(study)
    points = exported(run_dir)
    want = len(front) if opt != "nsga2" else min(3, len(front))
    assert len(points) == want and sorted(points) == list(range(want))
    trials = {m["pareto"]["trial"] for m in points.values()}
    assert trials <= front and (opt == "nsga2" or trials == front)
    by_number = {t.number: t for t in study.get_trials()}
    for k, m in points.items():
        d = run_dir / "pareto" / str(k)
        for entry in m["exports"].values():  # metrics.json names its own files
            if "path" in entry:
                assert Path(entry["path"]).parent == d and Path(entry["path"]).is_file(), entry
        assert (d / "model.keras").is_file() and list(d.glob("model*.tflite"))
        assert set(m["ratios"]) >= {"download_size", "size", "latency"} and 0 <= m["test_accuracy"] <= 1
        t = by_number[m["pareto"]["trial"]]
        assert m["pareto"]["search_ratios"]["download_size"] == pytest.approx(t.values[1])
        assert m["params"] == t.user_attrs["projected"] or "target_met" in m  # a missed floor re-projects
    best = json.loads((run_dir / "best" / "metrics.json").read_text())
    ok = [m for m in points.values() if m.get("target_met", True)]
    assert best["pareto"]["point"] == max(ok, key=lambda m: (m["val_accuracy"], m["test_accuracy"]))["pareto"]["point"]
    assert all(Path(e["path"]).parent == run_dir / "best" for e in best["exports"].values() if "path" in e)
    report = (run_dir / "report.md").read_text()
    assert "## Pareto front" in report and "](front.png)" in report and (run_dir / "front.png").is_file()


def test_nsga2_spreads_the_budget_and_keeps_the_floor(runs):
    run_dir, proc = runs["nsga2"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = study_of(run_dir)
    rows = json.loads((run_dir / "pareto" / "front.json").read_text())["front"]
    chosen = [r for r in rows if r["point"] is not None]
    accs = [r["val_acc"] for r in rows]
    if len(rows) > 3:  # the two ends of the front are always among the spread points
        assert {max(accs), min(accs)} <= {r["val_acc"] for r in chosen}
    for t in study.get_trials():
        if t.state.name != "COMPLETE":
            continue
        measured = t.user_attrs["ratios"]["download_size"]
        assert t.user_attrs["feasible"] == (measured >= 8 * 0.99)
        assert (t.constraints["ratio"] <= 0) == t.user_attrs["feasible"]  # under the floor: infeasible
        assert t.user_attrs["predicted_ratio"] >= t.user_attrs["projected_to"] * 0.99
    assert all(r["ratios"]["download_size"] >= 8 * 0.99 for r in rows)
    ratios = [t.user_attrs["ratio"] for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert max(ratios) > 8 * 1.2, ratios  # a floor, not a goal: points above it stay where they were


def test_gp_draws_a_scalarization_per_trial(runs):
    run_dir, proc = runs["gp"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [t for t in study_of(run_dir).get_trials() if "scalarization" in t.user_attrs]
    assert len(trials) == 6
    weights = [tuple(t.user_attrs["scalarization"]["weights"]) for t in trials]
    assert len(set(weights)) == len(weights)
    assert all(len(w) == 2 and abs(sum(w) - 1) < 1e-9 and min(w) >= 0 for w in weights)


def test_median_pruner_records_curves_in_pareto_mode(runs):
    run_dir, proc = runs["tpe"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for t in study_of(run_dir).get_trials():
        assert t.state.name in ("COMPLETE", "PRUNED"), t.user_attrs.get("fail_reason")
        assert t.user_attrs.get("curve"), t.number


def test_front_and_best_ratio_from_the_cli(runs):
    run_dir, proc = runs["tpe"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    points = exported(run_dir)
    shown = run_cli_inprocess("front", run_dir)
    assert shown.returncode == 0, shown.stderr
    for k, m in points.items():
        assert f"| {k} | {m['pareto']['trial']} |" in shown.stdout and f"{m['test_accuracy']:.4f}" in shown.stdout
    ratios = sorted(m["ratios"]["download_size"] for m in points.values())
    r = ratios[len(ratios) // 2]
    ok = [m for m in points.values() if m["ratios"]["download_size"] >= r * 0.99]
    want = max(ok, key=lambda m: (m["val_accuracy"], m["test_accuracy"]))
    got = run_cli_inprocess("best", run_dir, "--ratio", r)
    assert got.returncode == 0, got.stderr
    assert f"checkpoint: {run_dir / 'pareto' / str(want['pareto']['point']) / 'model.keras'}" in got.stdout
    assert f"pareto point: {want['pareto']['point']}" in got.stdout
    from pocketflow import api
    assert api.best(run_dir, ratio=r, metric="download_size")["pareto"] == want["pareto"]
    far = run_cli_inprocess("best", run_dir, "--ratio", ratios[-1] * 3, "--metric", "download_size")
    assert_one_line_error(far, "no exported point", "download_size", "the highest is")


def test_config_errors_are_one_line_before_training(seed_model, tmp_path):
    cases = [(", objectives: []", "needs 'search.objectives'"),
             (", objectives: [accuracy, sizee]", "unknown objective 'sizee'"),
             (", objectives: [download_size, accuracy]", "accuracy first")]
    for extra, piece in cases:
        cfg = write_config(tmp_path / "bad.yaml", "bad", seed_model, "tpe")
        cfg.write_text(cfg.read_text().replace(", objectives: [accuracy, download_size]", extra))
        proc = run_cli_inprocess("run", cfg, "--output", tmp_path / "runs")
        assert_one_line_error(proc, piece)
        assert not (tmp_path / "runs" / "bad").exists()
    cfg = write_config(tmp_path / "x.yaml", "x", seed_model, "tpe")
    cfg.write_text(cfg.read_text().replace("objective: pareto, ", ""))
    assert_one_line_error(run_cli_inprocess("run", cfg, "--output", tmp_path / "runs"),
                          "search.objectives", "without search.objective: pareto")


def test_killed_during_final_fine_tunes_resumes_keeping_points(seed_model, tmp_path):
    cfg = write_config(tmp_path / "k.yaml", "kill", seed_model, "random", trials=5, extra=", pruner: none")
    run_dir = tmp_path / "runs" / "kill"
    killed = run_cli("run", cfg, "--output", tmp_path / "runs", env={"POCKETFLOW_KILL_AT": "final_export:2"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = exported(run_dir)
    assert list(first) == [0]  # point 1 was staged, not swapped in: nothing half-written in pareto/
    assert not (run_dir / "pareto" / "1").exists()
    stamp = (run_dir / "pareto" / "0" / "metrics.json").stat().st_mtime_ns
    resumed = run_cli("run", cfg, "--output", tmp_path / "runs", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pareto/0: kept" in resumed.stdout
    assert (run_dir / "pareto" / "0" / "metrics.json").stat().st_mtime_ns == stamp
    after = exported(run_dir)
    front = independent_front(study_of(run_dir))
    assert {m["pareto"]["trial"] for m in after.values()} == front and first[0] == after[0]
    assert not list(run_dir.glob(".best.*")) and (run_dir / "best" / "metrics.json").is_file()
