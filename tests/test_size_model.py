"""TFLite file-size predictions (pocketflow.export.size_model) against real conversions.

Every expected value is measured here by converting a numpy-compressed copy of the trained seed
CNN (pruned by magnitude, snapped to a codebook or a per-channel grid), so a wrong prediction fails.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

GZIP_BOUND = 0.05        # relative, dense files (measured worst on seed CNN / VGG-small: see the report)
SPARSE_GZIP_BOUND = 0.07
SPARSE_RAW_BOUND = 64    # bytes: the DENSIFY tensors' names are not modelled byte for byte


def _variant(model, sparsity=0.0, kind="float", bits=32):
    """A copy of `model` with every kernel pruned / snapped like the learners do, and its reps."""
    import keras

    from pocketflow.learners.accounting import KernelRep
    from pocketflow.learners.kernels import is_depthwise, kernel_variable
    from pocketflow.learners.transforms.codebook import kmeans_1d, nearest_index
    from pocketflow.learners.transforms.mask import magnitude_mask
    from pocketflow.learners.wrap import kernel_layers
    m = keras.models.clone_model(model)
    m.set_weights(model.get_weights())
    reps = {}
    for name, layer, _ in kernel_layers(m):
        var, dw = kernel_variable(layer), is_depthwise(layer)
        k = var.numpy()
        if sparsity:
            k = k * magnitude_mask(k, sparsity, "unstructured", dw)
        if kind == "codebook":
            nz = k != 0
            c = np.concatenate([[0.0], kmeans_1d(k[nz], 2 ** bits - 1)])
            k = np.where(nz, c[nearest_index(k.ravel(), c)].reshape(k.shape), 0).astype(np.float32)
        elif kind == "grid":
            q = 2 ** (bits - 1) - 1
            s = np.max(np.abs(k), axis=tuple(range(k.ndim - 1)), keepdims=True) / q
            k = (np.round(k / np.where(s > 0, s, 1)) * s).astype(np.float32)
        var.assign(k)
        reps[name] = KernelRep(k.shape, dw, int(np.sum(k == 0)), sparsity > 0, kind, bits)
    return m, reps


@pytest.fixture(scope="module")
def calibrated(trained_seed_cnn, small_data):
    from pocketflow.export.size_model import TFLiteSizeModel
    rep = small_data.representative(16)
    return TFLiteSizeModel.calibrate(trained_seed_cnn, rep, sparse_encoding=True), rep


def _measure(model, deploy, rep, sparsity=False, weight_scales="auto"):
    from pocketflow.export import to_tflite
    from pocketflow.metrics import gzip_size
    blob = to_tflite(model, None if deploy == "float" else "int8", rep, sparsity=sparsity,
                     weight_scales=weight_scales)
    return len(blob), gzip_size(blob)


def test_every_kernel_layer_found(calibrated, trained_seed_cnn):
    from pocketflow.learners.accounting import base_reps
    sm, _ = calibrated
    assert set(sm.layers) == set(base_reps(trained_seed_cnn))
    for d in ("float", "int8"):   # the baseline predicts itself exactly
        assert sm.predict(base_reps(trained_seed_cnn), d) == sm.base[d]


@pytest.mark.parametrize("sparsity,kind,bits", [(0.5, "float", 32), (0.9, "float", 32), (0.0, "codebook", 4),
                                                (0.8, "codebook", 2), (0.5, "grid", 4)])
def test_dense_file_predicted(calibrated, trained_seed_cnn, sparsity, kind, bits):
    sm, rep = calibrated
    m, reps = _variant(trained_seed_cnn, sparsity, kind, bits)
    for deploy in ("float", "int8"):
        raw, gz = _measure(m, deploy, rep, weight_scales="per_channel")
        p = sm.predict(reps, deploy)
        assert p.raw == raw, (deploy, p, raw)
        assert abs(p.gzip - gz) <= GZIP_BOUND * gz, (deploy, p, gz)


def test_per_tensor_int8_raw(calibrated, trained_seed_cnn):
    """One scale per tensor shrinks the quantization parameters, not the weights."""
    sm, rep = calibrated
    m, reps = _variant(trained_seed_cnn, 0.5, "codebook", 4)
    raw, gz = _measure(m, "int8", rep, weight_scales="per_tensor")
    p = sm.predict(reps, "int8", weight_scales="per_tensor")
    assert abs(p.raw - raw) <= 16 and abs(p.gzip - gz) <= GZIP_BOUND * gz, (p, raw, gz)


@pytest.mark.parametrize("sparsity", [0.8, 0.95])
def test_sparse_encoding_predicted(calibrated, trained_seed_cnn, sparsity):
    sm, rep = calibrated
    m, reps = _variant(trained_seed_cnn, sparsity)
    for deploy in ("float", "int8"):
        raw, gz = _measure(m, deploy, rep, sparsity=True, weight_scales="per_channel")
        p = sm.predict(reps, deploy, sparse_encoding=True)
        assert abs(p.raw - raw) <= SPARSE_RAW_BOUND, (deploy, p, raw)
        assert abs(p.gzip - gz) <= SPARSE_GZIP_BOUND * gz, (deploy, p, gz)
        assert p.raw < sm.predict(reps, deploy).raw   # the point of the encoding


def test_prediction_is_fast_and_ratio(calibrated, trained_seed_cnn):
    sm, _ = calibrated
    _, reps = _variant(trained_seed_cnn, 0.7)
    t = time.perf_counter()
    for _ in range(20):
        p = sm.predict(reps, "int8")
    assert (time.perf_counter() - t) / 20 < 0.005
    assert sm.ratio(reps, "size", "int8") == pytest.approx(sm.base["float"].raw / p.raw)
    assert sm.ratio(reps, "download_size") > 1.5
    with pytest.raises(ValueError):
        sm.ratio(reps, "compression")
