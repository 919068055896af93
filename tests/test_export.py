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


# -- int8 weight scales -------------------------------------------------------------------------

def int8_kernels(blob: bytes) -> dict:
    """{shape: (int8 codes, scales)} of the int8 weight tensors (ndim >= 2) of a TFLite model."""
    it = M.tflite_interpreter(blob)
    it.allocate_tensors()
    out = {}
    for d in it.get_tensor_details():
        if d["dtype"] == np.int8 and len(d["shape"]) >= 2 and d["shape"][0] != 1:
            try:
                codes = it.get_tensor(d["index"])
            except ValueError:
                continue
            out[tuple(int(s) for s in d["shape"])] = (codes, np.asarray(d["quantization_parameters"]["scales"]))
    return out


def on_grids(model, levels: int = 8):
    """A copy of `model` whose Dense kernel holds `levels` values on ONE symmetric int8 grid (what
    uniform_quant trains on top of a codebook) and whose conv kernel is on a per-channel int8 grid."""
    import keras
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    conv, dense = m.get_layer("conv"), m.get_layer("logits")
    k = conv.kernel.numpy()
    s = np.abs(k).max(axis=(0, 1, 2), keepdims=True) / 127
    conv.kernel.assign(np.round(k / s) * s)
    d = dense.kernel.numpy()
    codes = np.round(np.linspace(-127, 127, levels))
    s = np.abs(d).max() / 127
    d = codes[np.argmin(np.abs(d[..., None] / s - codes), axis=-1)] * s
    dense.kernel.assign(d.astype(np.float32))
    return m


def test_int8_weight_scales_follow_the_trained_grids(trained_seed_cnn, small_data):
    from pocketflow.export import choose_weight_scales
    m = on_grids(trained_seed_cnn)
    assert choose_weight_scales(trained_seed_cnn) == "per_channel"  # a float model: as before
    assert choose_weight_scales(m) == "per_tensor_dense"
    rep = small_data.representative()
    auto, per_channel = to_tflite(m, "int8", rep), to_tflite(m, "int8", rep, weight_scales="per_channel")
    dense_k, conv_k = m.get_layer("logits").kernel.numpy(), m.get_layer("conv").kernel.numpy()
    ks = int8_kernels(auto)
    codes, scales = ks[dense_k.shape[::-1]]
    # the 8 trained values on one scale (the converter may store it once per channel)
    assert len(np.unique(scales)) == 1 and len(np.unique(codes)) <= 8
    np.testing.assert_allclose(codes.T * scales[0], dense_k, rtol=0, atol=1e-6 * np.abs(dense_k).max())
    codes, scales = ks[(12, 3, 3, 1)]
    assert len(np.unique(scales)) == 12  # the conv keeps its per-channel grid, exactly
    np.testing.assert_allclose(np.transpose(codes * scales[:, None, None, None], (1, 2, 3, 0)), conv_k,
                               rtol=0, atol=1e-6 * np.abs(conv_k).max())
    # per channel, the converter re-quantizes the 8 values channel by channel: more codes, bigger gzip
    codes, scales = int8_kernels(per_channel)[dense_k.shape[::-1]]
    assert len(np.unique(scales)) > 1 and len(np.unique(codes)) > 8
    assert M.gzip_size(auto) < M.gzip_size(per_channel)
    # and the TFLite model computes what Keras does
    keras_acc = M.accuracy(m, small_data.x_test, small_data.y_test)
    assert abs(M.tflite_accuracy(auto, small_data.x_test, small_data.y_test) - keras_acc) <= 0.01
    # every layer on a per-tensor grid: all per tensor
    m.get_layer("conv").kernel.assign(np.round(conv_k / (np.abs(conv_k).max() / 127)) * (np.abs(conv_k).max() / 127))
    assert choose_weight_scales(m) == "per_tensor"
    assert {len(np.unique(v[1])) for v in int8_kernels(to_tflite(m, "int8", rep)).values()} == {1}


def test_export_model_records_weight_scales_and_rejects_unknown(trained_seed_cnn, small_data, tmp_path):
    import pytest

    from pocketflow.errors import PocketFlowError
    res = export_model(on_grids(trained_seed_cnn), tmp_path, ("tflite",), "int8", small_data, verify=False)
    assert res["files"]["tflite_int8"]["weight_scales"] == "per_tensor_dense"
    res = export_model(trained_seed_cnn, tmp_path, ("tflite",), "int8", small_data, verify=False,
                       weight_scales="per_tensor")
    assert res["files"]["tflite_int8"]["weight_scales"] == "per_tensor"
    with pytest.raises(PocketFlowError, match="weight_scales"):
        to_tflite(trained_seed_cnn, "int8", small_data.representative(), weight_scales="per_row")


def test_on_tensor_grid():
    from pocketflow.export import on_tensor_grid
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    assert not on_tensor_grid(w)  # float weights
    for b in (8, 4, 2):
        qmax = 2 ** (b - 1) - 1
        s = np.abs(w).max() / qmax
        assert on_tensor_grid(np.round(w / s) * s), b  # a per-tensor grid of b <= 8 bits
    s = np.abs(w).max(axis=0) / 127
    assert not on_tensor_grid(np.round(w / s) * s)  # a per-channel grid is not a per-tensor one
    assert on_tensor_grid(np.zeros((3, 3)))


# -- sparse tensor encoding (docs/benchmarks/sparse_encoding.md) --------------------------------

def magnitude_pruned(model, s: float, pattern: str = "unstructured"):
    """A copy of the seed CNN with the share `s` of smallest-|w| weights of both kernels set to zero."""
    import keras

    from pocketflow.learners.transforms.mask import magnitude_mask
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    for layer in (m.get_layer("conv"), m.get_layer("logits")):
        layer.kernel.assign(layer.kernel.numpy() * magnitude_mask(layer.kernel.numpy(), s, pattern, False))
    return m


def test_sparse_encoding_float_smaller_and_close(trained_seed_cnn, small_data):
    from pocketflow.export import sparse_tensors
    m = magnitude_pruned(trained_seed_cnn, 0.9)
    dense, enc = to_tflite(m), to_tflite(m, sparse_encoding="on")
    assert len(enc) * 5 <= len(dense)          # measured 5.29x at 90% unstructured
    assert {t["op"] for t in sparse_tensors(enc)} == {"CONV_2D", "FULLY_CONNECTED"}
    x = small_data.x_test[:100]
    assert np.abs(M.TFLiteRunner(enc).predict(x) - M.predict(m, x)).max() <= 1e-4
    assert to_tflite(m, sparse_encoding="auto") == enc
    assert to_tflite(m, sparse_encoding="off") == dense   # off: today's file, byte for byte
    assert not sparse_tensors(dense)


def test_sparse_encoding_int8_only_where_it_runs(trained_seed_cnn, small_data):
    import pytest

    from pocketflow.errors import PocketFlowError
    from pocketflow.export.sparse import lost_nonzeros
    rep = small_data.representative(16)
    m = magnitude_pruned(trained_seed_cnn, 0.9)     # FULLY_CONNECTED as CSR + DENSIFY: XNNPACK refuses it
    dense = to_tflite(m, "int8", rep)
    assert to_tflite(m, "int8", rep, sparse_encoding="auto") == dense
    with pytest.raises(PocketFlowError, match="does not run"):
        to_tflite(m, "int8", rep, sparse_encoding="on")
    m = magnitude_pruned(trained_seed_cnn, 0.9, "1x16")
    k = m.get_layer("logits").kernel
    k.assign(np.concatenate([k.numpy()[:2016], np.full((12, 10), 0.05, np.float32)]))  # 2028 = 126x16 + 12
    dense = to_tflite(m, "int8", rep)
    assert lost_nonzeros(dense, to_tflite(m, "int8", rep, sparsity=True))   # the partial block is dropped
    assert to_tflite(m, "int8", rep, sparse_encoding="auto") == dense


def test_sparse_encoding_int8_blocks(small_data):
    """1x16 blocks on a Dense layer with a multiple of 16 inputs: encoded, within one output step."""
    import keras

    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(0)
    m = magnitude_pruned(build_model("seed_cnn", small_data.input_shape, 10, {"filters": 16}), 0.9, "1x16")
    rep, x = small_data.representative(16), small_data.x_test[:100]
    dense, enc = to_tflite(m, "int8", rep), to_tflite(m, "int8", rep, sparse_encoding="auto")
    assert len(enc) * 4 <= len(dense)          # measured 4.05x
    step = M.TFLiteRunner(dense).out["quantization"][0]
    assert np.abs(M.TFLiteRunner(enc).predict(x) - M.TFLiteRunner(dense).predict(x)).max() <= 1.001 * step


def test_export_model_records_sparse_encoding_and_config_refuses_bad(trained_seed_cnn, small_data, tmp_path):
    import pytest

    from pocketflow.config import load_config
    from pocketflow.errors import ConfigError
    m = magnitude_pruned(trained_seed_cnn, 0.9)
    f = export_model(m, tmp_path, ("tflite",), "int8", small_data, verify=False, sparse_encoding="auto")["files"]
    assert f["tflite"]["sparse_encoding"] == {"mode": "auto", "encoded": True}
    assert f["tflite_int8"]["sparse_encoding"] == {"mode": "auto", "encoded": False}
    assert "sparse_encoding" not in export_model(m, tmp_path, ("tflite",), verify=False)["files"]["tflite"]
    base = {"data": {"name": "mnist"}, "model": {"name": "seed_cnn"}}
    assert load_config(base)["export"]["sparse_encoding"] == "off"
    assert load_config({**base, "export": {"sparse_encoding": "auto"}})["export"]["sparse_encoding"] == "auto"
    with pytest.raises(ConfigError, match="sparse_encoding"):
        load_config({**base, "export": {"sparse_encoding": "yes"}})
