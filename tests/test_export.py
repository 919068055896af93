"""Exports run in a real TFLite interpreter and agree with Keras."""
import json

import numpy as np

from pocketflow import metrics as M
from pocketflow.export import export_model, to_tflite


def test_float_tflite_matches_keras(trained_seed_cnn, small_data):
    blob = to_tflite(trained_seed_cnn)
    x = small_data.x_test[:100]
    diff = np.abs(M.TFLiteRunner(blob).predict(x) - M.predict(trained_seed_cnn, x)).max()
    assert diff < 1e-4


def test_int8_export_small_and_accurate(trained_seed_cnn, small_data, tmp_path):
    res = export_model(trained_seed_cnn, tmp_path, ("keras", "saved_model", "tflite"), "int8", small_data)
    f = res["files"]
    assert f["tflite_int8"]["bytes"] <= 0.35 * f["tflite"]["bytes"]
    keras_acc = M.accuracy(trained_seed_cnn, small_data.x_test, small_data.y_test)
    assert abs(f["tflite_int8"]["test_accuracy"] - keras_acc) <= 0.005
    assert abs(f["tflite"]["test_accuracy"] - keras_acc) <= 0.001
    assert (tmp_path / "model_saved_model" / "saved_model.pb").is_file()
    # int8 model really is integer end to end
    interp = M.tflite_interpreter((tmp_path / "model_int8.tflite").read_bytes())
    assert interp.get_input_details()[0]["dtype"] == np.int8


def test_latency_measure_is_positive(trained_seed_cnn):
    ms = M.tflite_latency(to_tflite(trained_seed_cnn), (28, 28, 1), batch=4, runs=5, warmup=1)
    assert 0 < ms < 1000


def test_dynamic_range_export(trained_seed_cnn, small_data, tmp_path):
    res = export_model(trained_seed_cnn, tmp_path, ("tflite",), "dynamic", small_data)
    assert res["files"]["tflite_dynamic"]["bytes"] < 0.5 * res["files"]["tflite"]["bytes"]
    json.dumps(res)  # serialisable for metrics.json
