"""The CLI as a user meets it: real subprocesses, exit codes, run layout (bad inputs: test_bad_inputs.py)."""
import json
import shutil
from importlib.metadata import version

import pytest

from conftest import SMALL_NPZ, assert_one_line_error, run_cli

SMALL = f"data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1}}\nmodel: {{name: seed_cnn}}\n"


def test_debug_shows_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: npz, path: /nonexistent/x.npz}\nmodel: {name: seed_cnn}\n")
    proc = run_cli("--debug", "run", cfg, "--output", tmp_path / "runs")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_train_export_inspect_evaluate_best(tmp_path):
    cfg = tmp_path / "q.yaml"
    cfg.write_text("name: q\n" + SMALL + "train: {epochs: 2, batch_size: 64}\n"
                   "export: {formats: [keras, tflite], quantize: int8}\n")
    proc = run_cli("train", cfg, "--output", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    best = tmp_path / "runs" / "q" / "best"
    assert "best checkpoint: " in proc.stdout
    for f in ("model.keras", "model.tflite", "model_int8.tflite", "metrics.json"):
        assert (best / f).is_file(), f
    m = json.loads((best / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.6
    assert abs(m["exports"]["tflite_int8"]["test_accuracy"] - m["test_accuracy"]) < 0.01
    assert (tmp_path / "runs" / "q" / "config.yaml").is_file()
    # a second run refuses to overwrite, --resume reuses the baseline
    again = run_cli("train", cfg, "--output", tmp_path / "runs")
    assert_one_line_error(again, "already exists", "--resume", "--force")
    resumed = run_cli("train", cfg, "--output", tmp_path / "runs", "--resume")
    assert resumed.returncode == 0 and "reusing" in resumed.stdout

    out = run_cli("inspect", best / "model.keras")
    assert out.returncode == 0 and "73,008" in out.stdout and "20,280" in out.stdout
    out = run_cli("evaluate", best / "model_int8.tflite", "--data", SMALL_NPZ)
    assert out.returncode == 0 and "test accuracy: " in out.stdout
    acc = float(out.stdout.split("test accuracy: ")[1].split()[0])
    assert abs(acc - m["exports"]["tflite_int8"]["test_accuracy"]) < 1e-9
    out = run_cli("export", tmp_path / "runs" / "q", "--format", "tflite", "--quantize", "dynamic",
                  "--output", tmp_path / "exp")
    assert out.returncode == 0 and (tmp_path / "exp" / "model_dynamic.tflite").is_file()
    out = run_cli("best", tmp_path / "runs" / "q")
    assert out.returncode == 0 and str(best / "model.keras") in out.stdout


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pocketflow {version('pocketflow')}"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A small finished run (1 epoch on 600 images, keras + tflite + int8 exported)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tmp / "r.yaml"
    cfg.write_text("name: r\n" + SMALL.replace("val_split: 0.1}", "val_split: 0.1, limit_train: 600}")
                   + "train: {epochs: 1, batch_size: 64, verbose: false}\n"
                   "export: {formats: [keras, tflite], quantize: int8}\n")
    proc = run_cli("train", cfg, "--output", tmp / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "runs" / "r"


def _copy_run(run, tmp_path):
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst)
    return dst


def _accuracy(proc) -> float:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split("test accuracy: ")[1].split()[0])


def test_evaluate_uses_the_runs_own_data(finished_run):
    """Without --data, a model inside a run is tested on that run's data (its config.yaml)."""
    m = json.loads((finished_run / "best" / "metrics.json").read_text())
    assert _accuracy(run_cli("evaluate", finished_run)) == round(m["test_accuracy"], 4)
    assert _accuracy(run_cli("evaluate", finished_run / "best" / "model.keras")) == round(m["test_accuracy"], 4)
    int8 = _accuracy(run_cli("evaluate", finished_run / "best" / "model_int8.tflite"))
    assert int8 == round(m["exports"]["tflite_int8"]["test_accuracy"], 4)


def test_evaluate_outside_a_run_needs_data(finished_run, tmp_path):
    shutil.copy(finished_run / "best" / "model.keras", tmp_path / "m.keras")
    assert_one_line_error(run_cli("evaluate", tmp_path / "m.keras"), "m.keras", "not inside a run directory",
                          "--data")


def test_export_into_best_updates_metrics(finished_run, tmp_path):
    """Re-exporting into a run's own best/ (no --output) leaves metrics.json describing the files
    now on disk: sizes, gzip sizes, accuracy, layout."""
    from pocketflow.metrics import gzip_size
    run = _copy_run(finished_run, tmp_path)
    best = run / "best"
    old = json.loads((best / "metrics.json").read_text())["exports"]["tflite_int8"]
    assert old["weight_scales"] == "per_channel"
    proc = run_cli("export", run, "--quantize", "int8", "--weight-scales", "per_tensor", "--data", SMALL_NPZ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exports = json.loads((best / "metrics.json").read_text())["exports"]
    new = exports["tflite_int8"]
    assert new["weight_scales"] == "per_tensor" and new["bytes"] != old["bytes"]
    printed = proc.stdout.split("tflite_int8: ")[1].splitlines()[0]
    assert f"test accuracy {new['test_accuracy']:.4f}" in printed and str(best / "model_int8.tflite") in printed
    for key, entry in exports.items():
        if "path" not in entry:
            continue
        f = best / entry["path"].rsplit("/", 1)[1]
        assert entry["path"] == str(f), key
        if "bytes" in entry:
            assert entry["bytes"] == f.stat().st_size, key
            assert entry["gzip_bytes"] == gzip_size(f), key
    assert not list(run.glob(".best*"))  # the staging copy was swapped in, nothing left over
    # the shipped file's ratios were measured again on the new file (issue 14: they name it)
    m = json.loads((best / "metrics.json").read_text())
    assert m["shipped"]["file"] == "model_int8.tflite" and m["shipped"]["bytes"] == new["bytes"]
    assert m["shipped"]["test_accuracy"] == new["test_accuracy"]
    for metric, value in (("size", new["bytes"]), ("download_size", new["gzip_bytes"])):
        r = m["measured"][metric]
        assert r["value"] == value and r["file"] == "model_int8.tflite"
        assert m["ratios"][metric] == r["ratio"] == pytest.approx(r["baseline_value"] / value)
