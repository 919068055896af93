"""Targets measured on the file the user ships (pocketflow.targets), predicted before training.

Every ratio here is recomputed independently from the files: the baseline's float TFLite
converted by the test, the shipped file read from best/, gzip'd by the test.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_NPZ, assert_one_line_error, learner_cfg, run_cli, run_cli_inprocess

from pocketflow.learners import LEARNERS, Budget  # noqa: E402
from pocketflow.targets import FILE_METRICS, METRICS, Shipped  # noqa: E402


def gz(blob: bytes) -> int:
    return len(gzip.compress(blob, compresslevel=9, mtime=0))


def shipped_int8(data) -> Shipped:
    return Shipped(deploy="int8", representative=data.representative())


def chain(*steps, **sections):
    cfg = learner_cfg("chain", steps=list(steps), **sections)
    return LEARNERS.get("chain")(cfg, seed=0)


@pytest.mark.parametrize("steps, params, metric, tol", [
    (("weight_sparsity", "uniform_quant"), {"sparsity": 0.7}, "download_size", 0.05),
    (("weight_sparsity", "uniform_quant"), {"sparsity": 0.7}, "size", 0.01),
    (("channel_pruning", "uniform_quant"), {"preserve_ratio": 0.6}, "size", 0.02),
    (("channel_pruning", "uniform_quant"), {"preserve_ratio": 0.6}, "download_size", 0.05),
])
def test_predicted_file_ratio_matches_the_converted_file(trained_seed_cnn, small_data, steps, params, metric, tol):
    """The size model's prediction (before any training) against the int8 file of the fine-tuned
    result: raw bytes nearly exact (dense buffers), gzip'd bytes within a few % (the trained weights
    gzip a little differently from the simulated ones)."""
    learner = chain(*steps, **{steps[0]: params})
    learner.ship(shipped_int8(small_data))
    point = learner.default_params(trained_seed_cnn)
    predicted = learner.predict_ratio(trained_seed_cnn, point, metric)
    comp = learner.compress(trained_seed_cnn, point, small_data, Budget(steps=20))
    blob = learner.shipped.convert(comp.deploy)
    base = learner.shipped._baseline_blob(trained_seed_cnn)
    measured = (len(base) / len(blob)) if metric == "size" else gz(base) / gz(blob)
    assert learner.measure(trained_seed_cnn, comp, metric) == pytest.approx(measured, rel=1e-9)
    assert predicted == pytest.approx(measured, rel=tol)
    assert predicted > 1.5  # it did compress: pruning or zeros, then int8


def test_projection_meets_a_download_size_target(trained_seed_cnn, small_data):
    learner = chain("weight_sparsity", "uniform_quant")
    learner.ship(shipped_int8(small_data))
    p = learner.project(trained_seed_cnn, learner.default_params(trained_seed_cnn), "download_size", 8.0)
    assert 8.0 <= learner.predict_ratio(trained_seed_cnn, p, "download_size") <= 8.0 * 1.02
    ratios = [v for k, v in p.items() if "sparsity/" in k]
    assert ratios and max(ratios) > 0.5  # zeros do the work: int8 alone is ~4x gzip'd


def test_a_dense_float_file_cannot_get_smaller_and_is_refused_up_front(small_npz, tmp_path):
    """nonuniform_quant ships float TFLite: a codebook does not shrink a dense float buffer, so a
    `size` target is out of reach (max 1.00x) and refused before any training."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{name: npz, path: {small_npz}}}\nmodel: {{name: seed_cnn}}\n"
                   "learner: nonuniform_quant\ntarget: {metric: size, ratio: 2}\n")
    proc = run_cli_inprocess("run", cfg, "--output", tmp_path / "runs")
    assert_one_line_error(proc, "target size ratio 2x is out of reach", "maximum on this model is 1.00x")
    assert not (tmp_path / "runs" / "run").exists()  # nothing written (the lock file aside)
    cfg.write_text(f"data: {{name: npz, path: {small_npz}}}\nmodel: {{name: seed_cnn}}\n"
                   "learner: {name: distillation, student: seed_cnn}\ntarget: {metric: size, ratio: 2}\n")
    proc = run_cli_inprocess("run", cfg, "--output", tmp_path / "runs")
    assert_one_line_error(proc, "learner 'distillation' cannot target metric 'size'", "packed_size")


def run_on_saved_model(model, tmp: Path, name: str, rest: str) -> tuple[Path, str]:
    """`pocketflow run` of `model` (saved to tmp) on the sample with `rest` of the YAML config;
    returns (the run directory, what it printed)."""
    path = tmp / "seed.keras"
    model.save(path)
    cfg = tmp / "c.yaml"
    cfg.write_text(f"name: {name}\nseed: 0\ndata: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1}}\n"
                   f"model: {{name: {path}}}\n" + rest)
    proc = run_cli("run", cfg, "--output", tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "runs" / name, proc.stdout


@pytest.fixture(scope="module")
def download_run(tmp_path_factory, trained_seed_cnn):
    """`pocketflow run` with a download_size target, TPE over 4 short trials."""
    tmp = tmp_path_factory.mktemp("dl")
    run, out = run_on_saved_model(trained_seed_cnn, tmp, "dl",
                                  "learner: {name: auto, fine_tune: {epochs: 1, steps: 30, batch_size: 64, verbose: false}}\n"
                                  "target: {metric: download_size, ratio: 6, batch: 2, threads: 2}\n"
                                  "search: {optimizer: tpe, trials: 4, trial_steps: 20}\n")
    return run, out, tmp / "seed.keras"


def test_metrics_json_names_the_file_of_every_ratio(download_run):
    import keras

    from pocketflow.export import to_tflite
    run, out, model_path = download_run
    m = json.loads((run / "best" / "metrics.json").read_text())
    shipped = (run / "best" / "model_int8.tflite").read_bytes()
    base = to_tflite(keras.saving.load_model(model_path, compile=False))
    assert m["shipped"]["file"] == "model_int8.tflite" and m["shipped"]["bytes"] == len(shipped)
    assert set(m["measured"]) == set(METRICS)
    for metric in FILE_METRICS:
        r = m["measured"][metric]
        assert r["file"] == "model_int8.tflite" and r["of"].startswith(METRICS[metric].split("{")[0])
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"]) == pytest.approx(m["ratios"][metric])
    assert m["measured"]["size"]["value"] == len(shipped) and m["measured"]["size"]["baseline_value"] == len(base)
    assert m["measured"]["download_size"]["value"] == gz(shipped)
    assert m["measured"]["download_size"]["baseline_value"] == gz(base)
    assert m["ratios"]["download_size"] >= 6 * 0.99 and m["target_met"] is True  # on the shipped file
    assert m["measured"]["packed_size"]["file"] == "weights_packed.bin"
    assert "(batch 2, 2 thread(s))" in m["measured"]["latency"]["of"]  # target.batch / target.threads
    assert m["baseline"]["tflite_bytes"] == len(base) and m["baseline"]["tflite_gzip_bytes"] == gz(base)
    assert m["shipped"]["test_accuracy"] == m["exports"]["tflite_int8"]["test_accuracy"] > 0.5
    # what the run printed is what metrics.json holds, each ratio with its file
    line = next(ln for ln in out.splitlines() if ln.startswith("ratios: "))
    assert f"download_size {m['ratios']['download_size']:.2f}x" in line and "(model_int8.tflite)" in line
    assert "(weights_packed.bin)" in line


def test_every_trial_records_predicted_and_measured_ratio_on_the_file(download_run):
    import optuna
    run, out, _ = download_run
    trials = optuna.load_study(study_name="dl", storage=f"sqlite:///{run / 'study.db'}").get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert done
    for t in done:
        a = t.user_attrs
        assert a["file"] == "model_int8.tflite" and a["metric"] == "download_size"
        assert a["predicted_ratio"] == pytest.approx(a["ratio"], rel=0.08)  # a codebook gzips ~7% better
        assert a["projected_to"] >= 6 * 0.8
    lines = [ln for ln in out.splitlines() if ln.startswith("trial ") and "complete" in ln]
    assert lines and all("(model_int8.tflite; predicted " in ln for ln in lines)


def test_shipped_latency_is_timed_on_the_file_it_names(trained_seed_cnn, small_data):
    """`latency` times the shipped file, against the float baseline file, at the target's batch."""
    from pocketflow import metrics as M
    s = Shipped(deploy="int8", representative=small_data.representative(), batch=4, threads=1)
    blob = s.convert(trained_seed_cnn)
    runner = M.TFLiteRunner(blob, threads=1, batch=4)
    assert runner.inp["dtype"] == np.int8 and runner.inp["shape"][0] == 4
    r = s.ratio(trained_seed_cnn, blob, "latency")
    base_ms = s.baseline_value(trained_seed_cnn, "latency")
    assert base_ms > 0 and 0.05 < r < 20
    assert "batch 4" in s.describe("latency") and "model_int8.tflite" in s.describe("latency")


def test_auto_starts_from_each_methods_recipe_and_says_what_it_chose(download_run):
    import optuna

    from pocketflow.learners.auto import METHODS, method_name
    run, out, _ = download_run
    methods = [method_name(m) for m in METHODS["download_size"]]
    trials = optuna.load_study(study_name="dl", storage=f"sqlite:///{run / 'study.db'}").get_trials()
    first = trials[:len(methods)]
    assert [t.params["method"] for t in first] == methods and all(t.user_attrs.get("initial") for t in first)
    for t in trials:  # TPE asks a conditional space: a trial holds its own method's dimensions only
        own = set(t.params) - {"method"}
        assert own and all(k.startswith(t.params["method"] + "/") for k in own)
    m = json.loads((run / "best" / "metrics.json").read_text())
    best = trials[m["search"]["best_trial"]]
    assert m["info"]["method"] == best.params["method"] == m["params"]["method"]
    mix = m["search"]["methods"]
    assert sum(mix["tried"].values()) == len([t for t in trials if t.state.is_finished()])
    assert mix["best"].get(best.params["method"], 0) >= 1
    assert f"search: methods: {best.params['method']} " in out or f", {best.params['method']} " in out
    assert "- methods: " in (run / "report.md").read_text()
    assert f"learner: auto searches {len(methods)} method(s) for a download_size target" in out


def test_a_final_model_that_misses_the_target_is_compressed_again(trained_seed_cnn, small_data, capsys):
    """The full fine-tune can leave the shipped file short of the target; the run then projects
    once more, onto the target scaled by the miss, and the file it ships meets it."""
    from pocketflow.targets import meet_target
    learner = chain("weight_sparsity", "uniform_quant")
    learner.ship(shipped_int8(small_data))
    short = learner.project(trained_seed_cnn, learner.default_params(trained_seed_cnn), "download_size", 5.0)
    budget = Budget(steps=20)
    comp = learner.compress(trained_seed_cnn, short, small_data, budget)
    assert learner.measure(trained_seed_cnn, comp, "download_size") < 6 * 0.99
    target = {"metric": "download_size", "ratio": 6.0}
    params, again = meet_target(target, learner, trained_seed_cnn, small_data, short, comp, budget)
    assert learner.measure(trained_seed_cnn, again, "download_size") >= 6 * 0.99
    assert params != short and "misses the target 6x after the full fine-tune" in capsys.readouterr().out
    assert meet_target(target, learner, trained_seed_cnn, small_data, params, again, budget)[1] is again  # met


def test_a_method_search_ships_each_methods_own_file_type(trained_seed_cnn, tmp_path):
    """Auto over a float method and an int8 one: every trial is measured on its own method's file,
    and best/ ships the chosen method's (metrics.json and the files agree)."""
    import optuna
    run, _ = run_on_saved_model(trained_seed_cnn, tmp_path, "mix",
                                "learner: {name: auto, methods: [[channel_pruning], [uniform_quant]],\n"
                                "          fine_tune: {epochs: 1, steps: 10, batch_size: 64, verbose: false}}\n"
                                "target: {metric: size, ratio: 1.5}\n"
                                "search: {optimizer: tpe, trials: 2, trial_steps: 5}\n")
    trials = optuna.load_study(study_name="mix", storage=f"sqlite:///{run / 'study.db'}").get_trials()
    files = {t.params["method"]: t.user_attrs["file"] for t in trials if t.state.name == "COMPLETE"}
    assert files == {"channel_pruning": "model.tflite", "uniform_quant": "model_int8.tflite"}
    m = json.loads((run / "best" / "metrics.json").read_text())
    want = files[m["info"]["method"]]
    assert m["shipped"]["file"] == want and m["measured"]["size"]["file"] == want
    assert m["shipped"]["bytes"] == len((run / "best" / want).read_bytes())
    assert (run / "best" / "model_int8.tflite").exists() == (want == "model_int8.tflite")


def test_auto_for_latency_searches_int8_only_where_int8_runs_faster_here(trained_seed_cnn, tmp_path, capsys):
    """Whether int8 kernels beat float ones is the CPU's business: measured on the baseline's own
    files at set-up, and the int8 methods are searched only where they run faster."""
    from pocketflow.api import setup
    model = tmp_path / "seed.keras"
    trained_seed_cnn.save(model)
    cfg = {"name": "lat", "data": {"name": "npz", "path": str(SMALL_NPZ), "val_split": 0.1},
           "model": {"name": str(model)}, "learner": {"name": "auto", "fine_tune": {"epochs": 1}},
           "target": {"metric": "latency", "ratio": 1.3, "batch": 1, "threads": 1}}
    with setup(cfg, output=tmp_path / "runs") as ctx:
        int8 = ctx.shipped.with_deploy("int8")
        assert int8.deploy == "int8" and int8._base is ctx.shipped._base  # the baseline is measured once
        speed = int8.same_graph_ratio(ctx.model, "latency")  # the measurement set-up decided on (cached)
        searched = set(ctx.learner.methods)
    out = capsys.readouterr().out
    assert "channel_pruning" in searched
    if speed < 1.0:
        assert searched == {"channel_pruning"}
        assert f"method uniform_quant ships model_int8.tflite, which runs this model at {speed:.2f}x" in out
    else:
        assert "runs this model at" not in out
        assert ("uniform_quant" in searched) == (speed >= 1.3)  # alone it reaches int8's own speed-up
        assert "channel_pruning+uniform_quant" in searched


def test_sparse_encoding_through_a_run_and_pocketflow_export(trained_seed_cnn, tmp_path):
    """`export.sparse_encoding: auto` on a 90%-sparse model: best/model.tflite (float) holds sparse
    tensors and is several times smaller raw; the shipped int8 file is encoded only where the
    interpreter runs it alike (unstructured int8 Dense kernels do not: docs/benchmarks/sparse_encoding.md)
    and its ratios are measured on it as written; `pocketflow export --sparse-encoding off` writes
    the dense float file back and metrics.json follows the files on disk."""
    run, _ = run_on_saved_model(trained_seed_cnn, tmp_path, "sp",
                                "learner: {name: weight_sparsity, sparsity: 0.9,\n"
                                "          fine_tune: {epochs: 1, steps: 10, batch_size: 64, verbose: false}}\n"
                                "export: {sparse_encoding: auto}\n")
    best = run / "best"
    m = json.loads((best / "metrics.json").read_text())
    encoded = (best / "model.tflite").read_bytes()
    assert m["exports"]["tflite"]["sparse_encoding"] == {"mode": "auto", "encoded": True}
    assert m["exports"]["tflite"]["bytes"] == len(encoded)
    shipped = (best / "model_int8.tflite").read_bytes()
    assert m["shipped"]["file"] == "model_int8.tflite" and m["measured"]["size"]["value"] == len(shipped)
    assert m["exports"]["tflite_int8"]["sparse_encoding"]["mode"] == "auto"
    proc = run_cli("export", best.parent, "--sparse-encoding", "off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m2 = json.loads((best / "metrics.json").read_text())
    dense = (best / "model.tflite").read_bytes()
    assert m2["exports"]["tflite"]["bytes"] == len(dense) > 3 * len(encoded)  # zeros stored again
    assert "sparse_encoding" not in m2["exports"]["tflite"]
    assert m2["ratios"] == m["ratios"]  # the shipped int8 file was not rewritten
