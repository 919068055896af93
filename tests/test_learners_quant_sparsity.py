"""weight_sparsity, uniform_quant, nonuniform_quant and their shared wrappers: numbers that can fail.

Exact zero counts (in Keras, in the exported .keras and in the TFLite tensors), N:M / block
patterns, per-channel grids, codebook sizes, packed-export sizes to the byte, int8 TFLite
against the QAT model, BatchNorm folding, and the CLI's one-line errors.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import SMALL_NPZ, learner_cfg, run_cli

keras = pytest.importorskip("keras")

from pocketflow import metrics as M  # noqa: E402
from pocketflow.errors import ConfigError, PocketFlowError  # noqa: E402
from pocketflow.export import export_model, to_tflite  # noqa: E402
from pocketflow.learners import LEARNERS, Budget  # noqa: E402
from pocketflow.export.packed import read_packed  # noqa: E402
from pocketflow.learners.kernels import as_matrix  # noqa: E402
from pocketflow.learners.transforms import Codebook, MagnitudeMask, kmeans_1d, nearest_index  # noqa: E402
from pocketflow.learners.wrap import (KernelWrapper, calibrate_activations, strip_model, wrap_model,  # noqa: E402
                                      wrappers)


def make(name, **kw):
    return LEARNERS.get(name)(learner_cfg(name, **kw))


def kernels(model) -> dict:
    """Kernel of every Conv2D/DepthwiseConv2D/Dense of a plain model, by layer name."""
    L = keras.layers
    return {layer.name: layer.get_weights()[0] for layer in model.layers
            if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense))}


def int8_blob_matching_qat(comp, data) -> bytes:
    """The full-integer TFLite export of `comp`, checked within 0.5 pt of its QAT Keras model."""
    blob = to_tflite(comp.deploy, "int8", data.representative())
    qat = M.accuracy(comp.model, data.x_test, data.y_test)
    lite = M.tflite_accuracy(blob, data.x_test, data.y_test)
    assert abs(qat - lite) <= 0.005, (qat, lite)
    return blob


def tflite_kernels(blob: bytes, like: dict) -> dict:
    """The weight tensors of a TFLite model, read back with the interpreter, dequantized if int8
    and transposed to Keras layout; matched to `like` (name -> Keras kernel) by shape."""
    it = M.tflite_interpreter(blob)
    it.allocate_tensors()
    found = {}
    for d in it.get_tensor_details():
        shape = tuple(int(s) for s in d["shape"])
        for name, k in like.items():
            if k.ndim == 4:
                want, back = (k.shape[3], k.shape[0], k.shape[1], k.shape[2]), (1, 2, 3, 0)
            else:
                want, back = (k.shape[1], k.shape[0]), (1, 0)
            if shape == want and name not in found:
                t = it.get_tensor(d["index"]).astype(np.float32)
                q = d["quantization_parameters"]
                if d["dtype"] == np.int8:
                    scales = np.asarray(q["scales"], np.float32)
                    t = t * scales.reshape((-1,) + (1,) * (t.ndim - 1))
                found[name] = np.transpose(t, back)
    assert set(found) == set(like), (set(like) - set(found))
    return found


def input_layer_names(model) -> list:
    return [t._keras_history.operation.name for t in model.inputs]


def packed_size(model_kernels: dict, bits: int, table) -> int:
    return sum(math.ceil(bits * k.size / 8) + 4 * table(k) for k in model_kernels.values())


# -- weight_sparsity ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sparse80(trained_seed_cnn, small_data):
    before = [w.copy() for w in trained_seed_cnn.get_weights()]
    learner = make("weight_sparsity", sparsity=0.8)
    params = learner.default_params(trained_seed_cnn)
    oneshot = learner.compress(trained_seed_cnn, params, small_data, Budget(epochs=0))
    tuned = learner.compress(trained_seed_cnn, params, small_data, Budget(epochs=1))
    return learner, oneshot, tuned, before


def test_sparsity_exact_zeros_before_and_after_fine_tuning(sparse80, trained_seed_cnn):
    learner, oneshot, tuned, before = sparse80
    assert all(np.array_equal(a, b) for a, b in zip(before, trained_seed_cnn.get_weights())), \
        "the learner modified its input model"
    assert tuned.history is not None and tuned.history.steps > 0
    for comp in (oneshot, tuned):
        ks = kernels(comp.deploy)
        assert set(ks) == {"conv", "logits"}
        for name, k in ks.items():
            want = math.ceil(0.8 * k.size)
            assert abs(int(np.sum(k == 0)) - want) <= 1, (name, int(np.sum(k == 0)), want)
            assert comp.info["layers"][name]["zeros"] == int(np.sum(k == 0))
            # one zero bit pattern (+0.0, never the -0.0 a mask makes of a negative weight), so
            # float files compress: the zeros of a pruned kernel are all the same bytes
            assert not np.any(np.signbit(k[k == 0])), (name, int(np.sum(np.signbit(k[k == 0]))))
    # fine-tuning changed the surviving weights, not the mask
    a, b = kernels(oneshot.deploy)["logits"], kernels(tuned.deploy)["logits"]
    assert not np.allclose(a, b)
    assert not any(isinstance(layer, KernelWrapper) for layer in tuned.deploy.layers)


def test_sparsity_zeros_survive_keras_and_tflite_export(sparse80, small_data, tmp_path):
    learner, _, tuned, _ = sparse80
    res = export_model(tuned.deploy, tmp_path, ("keras", "tflite"), "int8", small_data, verify=False)
    ks = kernels(tuned.deploy)
    reloaded = kernels(keras.saving.load_model(res["files"]["keras"]["path"], compile=False))
    flt = tflite_kernels(open(res["files"]["tflite"]["path"], "rb").read(), ks)
    i8 = tflite_kernels(open(res["files"]["tflite_int8"]["path"], "rb").read(), ks)
    for name, k in ks.items():
        np.testing.assert_array_equal(reloaded[name], k)
        np.testing.assert_array_equal(flt[name] == 0, k == 0)
        assert np.all(i8[name][k == 0] == 0)  # int8 keeps every pruned zero ...
        assert np.sum(i8[name] == 0) - np.sum(k == 0) <= 0.01 * k.size  # ... and adds hardly any
    # the gzip'd int8 file is far below the gzip'd float file
    assert res["files"]["tflite_int8"]["gzip_bytes"] < res["files"]["tflite"]["gzip_bytes"] / 2.5


def test_sparsity_size_accounting_is_exact(sparse80, trained_seed_cnn, tmp_path):
    learner, _, tuned, _ = sparse80
    model = trained_seed_cnn
    params = learner.default_params(model)
    # bitmap (1 bit per weight) + float32 nonzeros beats CSR and dense at 80%
    n = kernels(tuned.deploy)["logits"].size
    nnz = n - math.ceil(0.8 * n)
    assert tuned.info["layers"]["logits"]["layout"] == "bitmap"
    assert tuned.info["layers"]["logits"]["bytes"] == math.ceil(n / 8) + 4 * nnz
    assert learner.measure(model, tuned, "packed_size") == pytest.approx(
        learner.predict_ratio(model, params, "packed_size"), rel=1e-3)
    assert learner.measure(model, tuned, "params") == pytest.approx(
        learner.predict_ratio(model, params, "params"), rel=1e-3)
    files = learner.export_extra(tuned, tmp_path)
    assert files["packed"]["bytes"] == tuned.info["kernel_bytes"]
    assert (tmp_path / "weights_packed.bin").stat().st_size == tuned.info["kernel_bytes"]
    decoded = read_packed(files["packed"]["path"], files["packed_manifest"]["path"])
    for name, k in kernels(tuned.deploy).items():
        np.testing.assert_array_equal(decoded[name], k)


def test_sparsity_projection_meets_target(trained_seed_cnn):
    learner = make("weight_sparsity", sparsity=0.3)
    model = trained_seed_cnn
    space = learner.search_space(model)
    assert set(space) == {"sparsity/conv", "sparsity/logits"}
    p = learner.project(model, learner.default_params(model), "packed_size", 8.0)
    assert 8.0 <= learner.predict_ratio(model, p, "packed_size") <= 8.0 * 1.05
    assert all(0 <= v < 1 for v in p.values())
    with pytest.raises(PocketFlowError, match="out of reach"):
        learner.project(model, learner.default_params(model), "packed_size", 1000.0)
    with pytest.raises(PocketFlowError):
        learner.predict_ratio(model, p, "flops")


def test_two_four_gives_two_zeros_in_every_group_of_four(trained_seed_cnn, small_data):
    learner = make("weight_sparsity", pattern="2:4")
    comp = learner.compress(trained_seed_cnn, learner.default_params(trained_seed_cnn), small_data,
                            Budget(steps=10))
    for name, k in kernels(comp.deploy).items():
        mat = as_matrix(k, False)  # rows: output channels; groups of 4 consecutive weights per row
        full = mat.shape[1] // 4
        zeros = (mat[:, : 4 * full].reshape(mat.shape[0], full, 4) == 0).sum(-1)
        assert np.all(zeros == 2), (name, np.unique(zeros))
    assert np.sum(kernels(comp.deploy)["logits"] == 0) == kernels(comp.deploy)["logits"].size // 2


def test_block_pattern_prunes_whole_blocks(trained_seed_cnn, small_data):
    learner = make("weight_sparsity", pattern="1x4", sparsity=0.75, skip=["conv"])
    comp = learner.compress(trained_seed_cnn, learner.default_params(trained_seed_cnn), small_data,
                            Budget(epochs=0))
    k = kernels(comp.deploy)
    assert not np.any(k["conv"] == 0)  # skipped
    blocks = as_matrix(k["logits"], False).reshape(10, -1, 4) == 0
    assert np.all(blocks.all(-1) | ~blocks.any(-1))  # each block all zero or all kept
    assert blocks.all(-1).sum() == math.ceil(0.75 * blocks.shape[0] * blocks.shape[1])


# -- uniform_quant ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uniform(trained_seed_cnn, small_data):
    out = {}
    for bits in (3, 8):
        learner = make("uniform_quant", bits=bits)
        out[bits] = (learner, learner.compress(trained_seed_cnn, learner.default_params(trained_seed_cnn),
                                               small_data, Budget(epochs=1)))
    return out


@pytest.mark.parametrize("bits", [3, 8])
def test_uniform_weights_on_per_channel_grid(uniform, bits, tmp_path):
    learner, comp = uniform[bits]
    qmax = 2 ** (bits - 1) - 1
    ks = kernels(comp.deploy)
    for name, k in ks.items():
        cols = k.reshape(-1, k.shape[-1])
        for c in range(cols.shape[1]):
            w = cols[:, c]
            assert len(np.unique(w)) <= 2 ** bits - 1
            s = np.abs(w).max() / qmax
            assert np.max(np.abs(w / s - np.round(w / s))) < 1e-3, (name, c)
    # the packed export: exactly ceil(bits * n / 8) + 4 * scales bytes, decoding to the same weights
    files = learner.export_extra(comp, tmp_path)
    want = packed_size(ks, bits, lambda k: k.shape[-1])
    assert files["packed"]["bytes"] == want == (tmp_path / "weights_packed.bin").stat().st_size
    assert comp.info["kernel_bytes"] == want
    assert comp.size_bytes == want + 4 * (M.count_params(comp.deploy) - sum(k.size for k in ks.values()))
    decoded = read_packed(files["packed"]["path"], files["packed_manifest"]["path"])
    for name, k in ks.items():
        np.testing.assert_array_equal(decoded[name], k)
    manifest = json.loads((tmp_path / "weights_packed.json").read_text())
    assert {e["name"]: e["bits"] for e in manifest["layers"]} == {n: bits for n in ks}


def test_uniform_int8_tflite_matches_qat_model(uniform, small_data):
    learner, comp = uniform[8]
    blob = int8_blob_matching_qat(comp, small_data)
    # what was trained is what TFLite stores: the converter's int8 weights are the QAT grid
    ks = kernels(comp.deploy)
    for name, t in tflite_kernels(blob, ks).items():
        assert np.max(np.abs(t - ks[name])) <= 1e-5 * np.abs(ks[name]).max(), name


def test_uniform_bits_per_layer_and_projection(trained_seed_cnn):
    learner = make("uniform_quant", bits=8, per_layer={"logits": 4})
    model = trained_seed_cnn
    assert learner.default_params(model) == {"bits/conv": 8, "bits/logits": 4}
    assert {type(d).__name__ for d in learner.search_space(model).values()} == {"Int"}
    p = learner.project(model, {"bits/conv": 8, "bits/logits": 8}, "packed_size", 6.0)
    assert all(2 <= v <= 8 and isinstance(v, int) for v in p.values())
    assert learner.predict_ratio(model, p, "packed_size") >= 6.0


def test_fold_batchnorm_is_exact_on_residual_and_sequential_graphs():
    from pocketflow.learners.uniform_quant import UniformQuant, fold_batchnorm
    L = keras.layers
    rng = np.random.default_rng(0)
    inp = keras.Input((10, 10, 3), name="img")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(inp)
    x = L.BatchNormalization(name="c1_bn")(x)
    x = L.ReLU(name="c1_relu")(x)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = L.BatchNormalization(name="dw_bn")(y)
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(4, name="fc")(x)
    seq = keras.Sequential([keras.Input((6, 6, 2)), L.Conv2D(3, 3, name="c"), L.BatchNormalization(name="bn"),
                            L.Activation("relu", name="act"), L.Flatten(), L.Dense(2, name="d")])
    for model, shape in ((keras.Model(inp, out), (10, 10, 3)), (seq, (6, 6, 2))):
        for layer in model.layers:
            if isinstance(layer, L.BatchNormalization):
                layer.set_weights([rng.uniform(0.5, 2, w.shape).astype(np.float32) for w in layer.get_weights()])
        before = [w.copy() for w in model.get_weights()]
        folded = fold_batchnorm(model)
        x = rng.random((3, *shape), dtype=np.float32)
        np.testing.assert_allclose(np.asarray(folded(x)), np.asarray(model(x)), rtol=1e-4, atol=1e-5)
        assert not any(isinstance(layer, (L.BatchNormalization, L.ReLU, L.Activation)) for layer in folded.layers)
        assert type(folded) is type(model) and input_layer_names(folded) == input_layer_names(model)
        assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
        assert UniformQuant(learner_cfg("uniform_quant")).prepared_params(model) == M.count_params(folded)


# -- nonuniform_quant ---------------------------------------------------------------------------

def test_nonuniform_codebook_values_and_exact_size(trained_seed_cnn, small_data, tmp_path):
    learner = make("nonuniform_quant", bits=2)
    comp = learner.compress(trained_seed_cnn, learner.default_params(trained_seed_cnn), small_data,
                            Budget(epochs=1))
    ks = kernels(comp.deploy)
    for name, k in ks.items():
        assert len(np.unique(k)) <= 4, name
    want = packed_size(ks, 2, lambda k: 4)  # 2^2 float32 codebook entries per layer
    files = learner.export_extra(comp, tmp_path)
    assert comp.info["kernel_bytes"] == files["packed"]["bytes"] == want
    assert (tmp_path / "weights_packed.bin").stat().st_size == want
    decoded = read_packed(files["packed"]["path"], files["packed_manifest"]["path"])
    for name, k in ks.items():
        np.testing.assert_array_equal(decoded[name], k)
    assert learner.measure(trained_seed_cnn, comp, "packed_size") == pytest.approx(
        learner.predict_ratio(trained_seed_cnn, learner.default_params(trained_seed_cnn), "packed_size"))
    # few distinct values: the float TFLite gzips far below the original's
    assert M.gzip_size(to_tflite(comp.deploy)) < 0.4 * M.gzip_size(to_tflite(trained_seed_cnn))
    assert M.accuracy(comp.deploy, small_data.x_test, small_data.y_test) > 0.6


def test_kmeans_1d_initialisations():
    v = np.random.default_rng(0).normal(size=5000)
    sse = lambda c: float(np.sum((v - c[nearest_index(v, c)]) ** 2))  # noqa: E731
    lin, km, qu = (kmeans_1d(v, 8, init) for init in ("linear", "kmeans", "quantile"))
    np.testing.assert_allclose(lin, np.linspace(v.min(), v.max(), 8))
    assert sse(km) < sse(lin) and sse(km) < sse(qu)  # Lloyd's iterations only improve on their start
    # linear spacing leaves most weights on the central codes: lower code entropy than k-means
    ent = lambda c: -sum(p * np.log2(p) for p in np.bincount(nearest_index(v, c)) / v.size if p > 0)  # noqa: E731
    assert ent(lin) < ent(km) - 0.2


def test_codebook_keeps_prior_zeros_and_centroid_gradient(trained_seed_cnn):
    import tensorflow as tf
    masked = wrap_model(trained_seed_cnn, lambda n: n == "logits", lambda n, layer, e: [MagnitudeMask()])
    w = wrappers(masked)[0]
    w.transforms[0].set_sparsity(w.kernel_input(0), 0.6)
    clustered = wrap_model(masked, lambda n: n == "logits", lambda n, layer, e: [Codebook(2)])
    w = wrappers(clustered)[0]
    eff, cb = w.effective_kernel(), w.transforms[1]
    assert np.sum(eff == 0) == math.ceil(0.6 * eff.size) and len(np.unique(eff)) <= 4
    assert cb.zero_fixed
    # each centroid's gradient is the sum of the gradients of the weights tied to it
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(clustered(x, training=True) ** 2)
        k = w.transformed_kernel(training=True)
    g_c = tape.gradient(y, cb.centroids)
    with tf.GradientTape() as tape:
        tape.watch(k)
        y = tf.reduce_sum(w.layer.activation(tf.matmul(tf.reshape(
            keras.layers.Flatten()(keras.layers.MaxPooling2D(2)(masked.get_layer("conv")(x))), (8, -1)), k)
            + w.layer.bias) ** 2)
    g_k = tape.gradient(y, k).numpy()
    idx = cb.indices.numpy()
    want = np.array([g_k[idx == i].sum() for i in range(4)]) * cb.free.numpy()
    np.testing.assert_allclose(g_c.numpy(), want, rtol=1e-4, atol=1e-6)


def test_uniform_weight_scales_per_tensor_is_exported_per_tensor(uniform, trained_seed_cnn, small_data):
    from pocketflow.export import choose_weight_scales
    assert choose_weight_scales(uniform[8][1].deploy) == "per_channel"  # default: per-channel grids
    learner = make("uniform_quant", bits=8, weight_scales="per_tensor")
    comp = learner.compress(trained_seed_cnn, learner.default_params(trained_seed_cnn), small_data, Budget(epochs=0))
    assert all(not t.per_channel for w in wrappers(comp.model) for t in w.transforms)
    assert choose_weight_scales(comp.deploy) == "per_tensor"
    blob = to_tflite(comp.deploy, "int8", small_data.representative())
    ks = kernels(comp.deploy)
    for name, t in tflite_kernels(blob, ks).items():  # the trained per-tensor grid, exactly
        assert np.max(np.abs(t - ks[name])) <= 1e-5 * np.abs(ks[name]).max(), name


# -- wrappers on other graphs -------------------------------------------------------------------

def test_wrap_and_strip_residual_depthwise_nested_graph(tmp_path):
    L = keras.layers
    inp = keras.Input((12, 12, 3), name="img")
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inp)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Add(name="add")([x, y])
    sub_in = keras.Input((12, 12, 8))
    x = keras.Model(sub_in, L.Conv2D(4, 1, name="inner")(sub_in), name="sub")(x)
    out = L.Dense(5, name="fc")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).random((4, 12, 12, 3), dtype=np.float32)
    wrapped = wrap_model(model, lambda n: True, lambda n, layer, e: [MagnitudeMask(
        depthwise=isinstance(layer, L.DepthwiseConv2D))], lambda n: 8)
    assert [w.name for w in wrappers(wrapped)] == ["c1", "dw", "inner", "fc"]
    np.testing.assert_allclose(np.asarray(wrapped(x)), np.asarray(model(x)), atol=1e-6)
    for w in wrappers(wrapped):
        w.transforms[0].set_sparsity(w.kernel_input(0), 0.5)
    calibrate_activations(wrapped, x)
    plain = strip_model(wrapped)
    assert not any(isinstance(layer, KernelWrapper) for layer in plain.layers + plain.get_layer("sub").layers)
    assert input_layer_names(plain) == ["img"]
    for name, k in {**kernels(plain), **kernels(plain.get_layer("sub"))}.items():
        assert np.sum(k == 0) == math.ceil(0.5 * k.size), name
    # a wrapped model saves and loads like any Keras model
    wrapped.save(tmp_path / "w.keras")
    back = keras.saving.load_model(tmp_path / "w.keras")
    np.testing.assert_allclose(np.asarray(back(x)), np.asarray(wrapped(x)), atol=1e-6)
    from pocketflow.export import verify_tflite
    assert verify_tflite(plain, to_tflite(plain), x) < 1e-4


# -- configuration errors -----------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, piece", [
    ("weight_sparsity", {"sparsity": 1.2}, "'learner.sparsity' must be in [0, 1)"),
    ("weight_sparsity", {"pattern": "4:2"}, "'learner.pattern'"),
    ("weight_sparsity", {"per_layer": {"conv": -0.1}}, "entry 'conv'"),
    ("uniform_quant", {"bits": 0}, "'learner.bits' must be between 2 and 8"),
    ("uniform_quant", {"activation_bits": 4}, "'learner.activation_bits' must be one of 8, 32"),
    ("nonuniform_quant", {"bits": 5}, "'learner.bits' must be between 1 and 4"),
])
def test_bad_hyperparameters_are_config_errors(name, kw, piece):
    with pytest.raises(ConfigError) as e:
        learner_cfg(name, **kw)
    assert piece in str(e.value) and "\n" not in str(e.value)


def test_bad_layer_names_and_params_are_one_line_errors(trained_seed_cnn, small_data):
    with pytest.raises(PocketFlowError, match=r"learner\.skip: model 'seed_cnn' has no layer 'logit'.*"
                                              r"did you mean 'logits'"):
        make("weight_sparsity", skip=["logit"]).check(trained_seed_cnn)
    with pytest.raises(PocketFlowError, match="has no kernel layer 'pool'"):
        make("uniform_quant", per_layer={"pool": 4}).check(trained_seed_cnn)
    with pytest.raises(PocketFlowError, match="no layer left"):
        make("nonuniform_quant", skip_first=True, skip_last=True).check(trained_seed_cnn)
    learner = make("weight_sparsity")
    for bad in ({"sparsity/conv": 1.2}, {"sparsity/nope": 0.5}):
        with pytest.raises(PocketFlowError):
            learner.compress(trained_seed_cnn, bad, small_data, Budget(epochs=0))


# -- the CLI ------------------------------------------------------------------------------------

def _yaml(tmp_path, learner: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(f"name: t\ndata: {{name: npz, path: {SMALL_NPZ}}}\nmodel: {{name: seed_cnn}}\n"
                 f"train: {{epochs: 1, verbose: false}}\nlearner: {learner}\n")
    return p


def test_cli_runs_weight_sparsity_from_yaml(tmp_path):
    cfg = _yaml(tmp_path, "{name: weight_sparsity, sparsity: 0.8, fine_tune: {epochs: 1, verbose: false}}")
    proc = run_cli("run", cfg, "--output", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    best = tmp_path / "runs" / "t" / "best"
    for f in ("model.keras", "model.tflite", "model_int8.tflite", "weights_packed.bin", "weights_packed.json"):
        assert (best / f).is_file(), f
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["learner"] == "weight_sparsity" and metrics["ratios"]["packed_size"] > 3
    assert metrics["exports"]["packed"]["bytes"] == (best / "weights_packed.bin").stat().st_size
    for name, k in kernels(keras.saving.load_model(best / "model.keras", compile=False)).items():
        assert abs(int(np.sum(k == 0)) - math.ceil(0.8 * k.size)) <= 1, name


BAD = [
    ("{name: weight_sparsity, sparsity: 1.2}", ["'learner.sparsity' must be in [0, 1), got 1.2"]),
    ("{name: uniform_quant, bits: 0}", ["'learner.bits' must be between 2 and 8, got 0"]),
    ("{name: nonuniform_quant, skip: [conv, nonexistent]}", ["learner.skip", "has no layer 'nonexistent'"]),
]


def test_cli_bad_hyperparameters_exit_with_one_line(tmp_path):
    """Sparsity 1.2, bits 0, a layer that does not exist: exit 2 with one `pocketflow: error:` line.
    (The three processes run side by side: each is mostly TensorFlow's start-up.)"""
    from concurrent.futures import ThreadPoolExecutor
    dirs = [tmp_path / str(i) for i in range(len(BAD))]
    for d in dirs:
        d.mkdir()
    with ThreadPoolExecutor(len(BAD)) as pool:
        procs = list(pool.map(lambda a: run_cli("run", _yaml(a[0], a[1][0]), "--output", a[0] / "runs"),
                              zip(dirs, BAD)))
    for proc, (learner, pieces) in zip(procs, BAD):
        assert proc.returncode == 2, (learner, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("pocketflow: error: "), proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        for p in pieces:
            assert p in lines[0], lines[0]
