"""The CLI as a user meets it: real subprocesses, exit codes, run layout (bad inputs: test_bad_inputs.py)."""
import json

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
