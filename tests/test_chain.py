"""`chain`: sparsity -> clustering -> 8-bit QAT keeps every earlier step's guarantees.

Exact mask zeros and <= 2^bits distinct values per layer in the deploy model, the int8 TFLite
close to the QAT model with the zeros intact, exact size accounting, prefixed search space,
config validation of the nested step sections, and a chain run from YAML through the CLI.
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
from pocketflow.learners import LEARNERS, Budget  # noqa: E402
from pocketflow.export.packed import read_packed  # noqa: E402
from pocketflow.learners.transforms import ActivationQuant, Codebook, FakeQuant, MagnitudeMask  # noqa: E402
from pocketflow.learners.wrap import wrappers  # noqa: E402

STEPS = ["weight_sparsity", "nonuniform_quant", "uniform_quant"]


def kernels(model) -> dict:
    L = keras.layers
    return {layer.name: layer.get_weights()[0] for layer in model.layers
            if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D, L.Dense))}


def chain(**kw):
    return LEARNERS.get("chain")(learner_cfg("chain", **kw))


@pytest.fixture(scope="module")
def chained(trained_seed_cnn, small_data):
    before = [w.copy() for w in trained_seed_cnn.get_weights()]
    learner = chain(steps=STEPS, weight_sparsity={"sparsity": 0.8}, nonuniform_quant={"bits": 3})
    comp = learner.compress(trained_seed_cnn, learner.default_params(trained_seed_cnn), small_data,
                            Budget(epochs=1))
    assert all(np.array_equal(a, b) for a, b in zip(before, trained_seed_cnn.get_weights()))
    return learner, comp


def test_chain_keeps_sparsity_zeros_and_codebook(chained):
    learner, comp = chained
    ws = {w.name: w for w in wrappers(comp.model)}
    assert {n: [type(t) for t in w.transforms] for n, w in ws.items()} == {
        n: [MagnitudeMask, Codebook, FakeQuant] for n in ("conv", "logits")}
    # one 8-bit activation quant per layer output: the conv's after its max pool (PooledQuant)
    assert isinstance(ws["logits"].act_quant, ActivationQuant) and ws["conv"].act_quant is None
    assert isinstance(comp.model.get_layer("pool").act_quant, ActivationQuant)
    for name, k in kernels(comp.deploy).items():
        mask = ws[name].transforms[0].mask.numpy()
        np.testing.assert_array_equal(k == 0, mask == 0)  # exactly the sparsity zeros, no others
        assert abs(int(np.sum(k == 0)) - math.ceil(0.8 * k.size)) <= 1
        assert len(np.unique(k)) <= 2 ** 3, (name, len(np.unique(k)))
        assert comp.info["layers"][name]["kind"] == "codebook"


def test_chain_int8_tflite_close_to_qat_and_keeps_zeros(chained, small_data):
    from test_learners_quant_sparsity import int8_blob_matching_qat, tflite_kernels
    learner, comp = chained
    assert learner.export_quantize == "int8"
    blob = int8_blob_matching_qat(comp, small_data)
    ks = kernels(comp.deploy)
    for name, t in tflite_kernels(blob, ks).items():
        assert np.all(t[ks[name] == 0] == 0), name


def test_chain_int8_export_holds_the_trained_codebook_values(chained, small_data):
    """Codebook + per-tensor QAT: the int8 file stores each layer's <= 2^bits trained values on one
    scale (what the export picks from the weights), not a per-channel re-quantization of them."""
    from test_export import int8_kernels
    from test_learners_quant_sparsity import int8_blob_matching_qat

    from pocketflow.export import choose_weight_scales, to_tflite
    learner, comp = chained
    assert all(not w.transforms[-1].per_channel for w in wrappers(comp.model))  # auto: per tensor on codebooks
    assert choose_weight_scales(comp.deploy) == "per_tensor"
    blob = int8_blob_matching_qat(comp, small_data)  # the default export, within 0.5 pt of the QAT model
    per_channel = to_tflite(comp.deploy, "int8", small_data.representative(), weight_scales="per_channel")
    ks, spread = int8_kernels(blob), int8_kernels(per_channel)
    for name, k in kernels(comp.deploy).items():
        shape = k.shape[::-1] if k.ndim == 2 else (k.shape[3], *k.shape[:3])
        codes, scales = ks[shape]
        assert len(np.unique(scales)) == 1 and len(np.unique(codes)) <= 2 ** 3, name
        back = codes * scales[0]
        back = back.T if k.ndim == 2 else np.transpose(back, (1, 2, 3, 0))
        np.testing.assert_allclose(back, k, rtol=0, atol=1e-6 * np.abs(k).max())
        assert np.array_equal(back == 0, k == 0)
    assert max(len(np.unique(c)) for c, _ in spread.values()) > 2 ** 3
    assert M.gzip_size(blob) < M.gzip_size(per_channel)


def test_chain_size_is_that_of_the_final_representation(chained, trained_seed_cnn, tmp_path):
    learner, comp = chained
    # sparse layout (bitmap or CSR) + 3-bit codebook indexes of the nonzeros + 8 float32 entries
    for name, k in kernels(comp.deploy).items():
        n, nnz = k.size, int(np.sum(k != 0))
        bitmap = math.ceil(n / 8) + math.ceil(3 * nnz / 8) + 4 * 8
        csr = 4 * (k.shape[-1] + 1) + 2 * nnz + math.ceil(3 * nnz / 8) + 4 * 8
        dense = math.ceil(3 * n / 8) + 4 * 8
        assert comp.info["layers"][name]["bytes"] == min(bitmap, csr, dense)
    params = learner.default_params(trained_seed_cnn)
    assert learner.measure(trained_seed_cnn, comp, "packed_size") == pytest.approx(
        learner.predict_ratio(trained_seed_cnn, params, "packed_size"), rel=1e-3)
    files = learner.export_extra(comp, tmp_path)
    assert files["packed"]["bytes"] == comp.info["kernel_bytes"] == (tmp_path / "weights_packed.bin").stat().st_size
    decoded = read_packed(files["packed"]["path"], files["packed_manifest"]["path"])
    for name, k in kernels(comp.deploy).items():
        np.testing.assert_array_equal(decoded[name], k)


def test_chain_search_space_scale_and_projection(trained_seed_cnn):
    learner = chain(steps=["weight_sparsity", "uniform_quant"], weight_sparsity={"sparsity": 0.2})
    model = trained_seed_cnn
    space = learner.search_space(model)
    assert set(space) == {"weight_sparsity/sparsity/conv", "weight_sparsity/sparsity/logits",
                          "uniform_quant/bits/conv", "uniform_quant/bits/logits"}
    p = learner.default_params(model)
    assert set(p) == set(space)
    lo, hi = (learner.predict_ratio(model, learner.scale(p, a), "packed_size") for a in (0.0, 1.0))
    assert lo > hi
    q = learner.project(model, p, "packed_size", 20.0)
    assert learner.predict_ratio(model, q, "packed_size") >= 20.0
    with pytest.raises(PocketFlowError, match="belongs to no step"):
        learner.predict_ratio(model, {"sparsity/conv": 0.5}, "packed_size")


def test_chain_step_budgets_follow_their_fine_tune_epochs():
    learner = chain(steps=["weight_sparsity", "uniform_quant"], fine_tune={"epochs": 2, "verbose": False},
                    uniform_quant={"fine_tune": {"epochs": 1, "learning_rate": 1e-4}})
    b = Budget(epochs=1.0, on_epoch_end=print)
    assert learner._budget("weight_sparsity", b, last=False).epochs == 1.0
    last = learner._budget("uniform_quant", b, last=True)
    assert last.epochs == 0.5 and last.on_epoch_end is print
    assert learner.cfg["uniform_quant"]["fine_tune"]["learning_rate"] == 1e-4
    assert learner.cfg["weight_sparsity"]["fine_tune"]["learning_rate"] == 1e-3


@pytest.mark.parametrize("kw, piece", [
    ({}, "'learner.steps'"),
    ({"steps": []}, "'learner.steps' must be a non-empty list"),
    ({"steps": ["weight_sparsty"]}, "did you mean 'weight_sparsity'"),
    ({"steps": ["weight_sparsity", "weight_sparsity"]}, "twice"),
    ({"steps": ["chain"]}, "cannot contain 'chain'"),
    ({"steps": ["weight_sparsity"], "uniform_quant": {"bits": 4}}, "unknown key 'learner.uniform_quant'"),
    ({"steps": ["weight_sparsity"], "weight_sparsity": {"sparsity": 1.2}},
     "'learner.weight_sparsity.sparsity' must be in [0, 1)"),
    ({"steps": ["uniform_quant"], "uniform_quant": {"bits": 0}}, "'learner.uniform_quant.bits'"),
    ({"steps": ["weight_sparsity"], "weight_sparsity": {"fine_tune": {"epochs": -1}}},
     "'learner.weight_sparsity.fine_tune.epochs'"),
])
def test_chain_config_errors(kw, piece):
    with pytest.raises(ConfigError) as e:
        learner_cfg("chain", **kw)
    assert piece in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif("channel_pruning" not in LEARNERS, reason="channel_pruning not registered")
def test_architecture_steps_must_come_first():
    with pytest.raises(ConfigError, match="'channel_pruning' must come before 'weight_sparsity'"):
        learner_cfg("chain", steps=["weight_sparsity", "channel_pruning"])


def test_chain_step_layer_name_error_names_the_step(trained_seed_cnn):
    learner = chain(steps=["weight_sparsity"], weight_sparsity={"skip": ["nope"]})
    with pytest.raises(PocketFlowError, match=r"learner\.weight_sparsity\.skip: model 'seed_cnn' has no layer"):
        learner.check(trained_seed_cnn)


@pytest.mark.skipif("channel_pruning" not in LEARNERS, reason="channel_pruning not registered")
def test_channel_pruning_then_sparsity(trained_seed_cnn, small_data):
    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(0)
    model = build_model("lenet5", small_data.input_shape, small_data.num_classes)
    learner = chain(steps=["channel_pruning", "weight_sparsity"], channel_pruning={"preserve_ratio": 0.5},
                    weight_sparsity={"sparsity": 0.5})
    comp = learner.compress(model, learner.default_params(model), small_data, Budget(steps=3))
    assert M.count_params(comp.deploy) < M.count_params(model)
    for name, k in kernels(comp.deploy).items():
        assert abs(int(np.sum(k == 0)) - math.ceil(0.5 * k.size)) <= 1, name


def test_chain_runs_from_yaml(tmp_path):
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(f"name: c\ndata: {{name: npz, path: {SMALL_NPZ}}}\nmodel: {{name: seed_cnn}}\n"
                   "train: {epochs: 1, verbose: false}\n"
                   "learner:\n  name: chain\n  steps: [weight_sparsity, nonuniform_quant, uniform_quant]\n"
                   "  fine_tune: {epochs: 1, verbose: false}\n  weight_sparsity: {sparsity: 0.7}\n"
                   "  nonuniform_quant: {bits: 4}\n")
    proc = run_cli("run", cfg, "--output", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr
    best = tmp_path / "runs" / "c" / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert {"tflite", "tflite_int8", "packed"} <= set(metrics["exports"])
    assert abs(metrics["exports"]["tflite_int8"]["test_accuracy"] - metrics["test_accuracy"]) <= 0.01
    assert metrics["exports"]["tflite_int8"]["weight_scales"] == "per_tensor"  # export.weight_scales: auto
    for name, k in kernels(keras.saving.load_model(best / "model.keras", compile=False)).items():
        assert abs(int(np.sum(k == 0)) - math.ceil(0.7 * k.size)) <= 1, name
        assert len(np.unique(k)) <= 16, name
