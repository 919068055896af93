"""Channel pruning: graph analysis, surgery, analytic costs, criteria, projection, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SMALL_NPZ, learner_cfg, run_cli, user_layer_module

keras = pytest.importorskip("keras")

from pocketflow import metrics as M  # noqa: E402
from pocketflow.errors import ConfigError, PocketFlowError  # noqa: E402
from pocketflow.learners import LEARNERS, Budget  # noqa: E402
from pocketflow.learners.channel_pruning.counts import allowed_counts, channels  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402
from pocketflow.learners.topology import PRODUCER, SEPARABLE  # noqa: E402
from pocketflow.zoo import build_model  # noqa: E402

L = keras.layers


def concat_model(input_shape=(28, 28, 1), num_classes=10):
    """Concatenate (offsets), a separable conv, a depthwise conv and Flatten -> Dense."""
    inp = keras.Input(input_shape, name="input")
    a = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(inp)
    b = L.Conv2D(6, 1, name="conv_b")(inp)
    x = L.Concatenate(name="cat1")([a, b])
    x = L.BatchNormalization(name="cat1_bn")(x)
    x = L.ReLU(name="cat1_relu")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    c = L.SeparableConv2D(10, 3, padding="same", name="sep_c")(x)
    d = L.DepthwiseConv2D(3, padding="same", name="dw_d")(x)
    x = L.Concatenate(name="cat2")([c, d])
    x = L.Conv2D(12, 3, strides=2, name="conv_e")(x)
    x = L.Flatten(name="flatten")(x)
    out = L.Dense(num_classes, name="logits")(x)
    return keras.Model(inp, out, name="concat_net")


def sequential_model(input_shape=(28, 28, 1), num_classes=10):
    return keras.Sequential([keras.Input(input_shape), L.Conv2D(8, 3, name="c1"), L.BatchNormalization(name="b1"),
                             L.ReLU(name="r1"), L.Conv2D(8, 3, strides=2, name="c2"), L.Flatten(name="f"),
                             L.Dense(num_classes, name="logits")], name="seq")


MODELS = {
    "seed_cnn": lambda: build_model("seed_cnn", (28, 28, 1), 10),
    "vgg_small": lambda: build_model("vgg_small", (32, 32, 3), 10),
    "resnet20": lambda: build_model("resnet20", (32, 32, 3), 10),
    "mobilenet_v1": lambda: build_model("mobilenet_v1", (32, 32, 3), 10, {"alpha": 0.5}),
    "mobilenet_v2": lambda: build_model("mobilenet_v2", (32, 32, 3), 10, {"alpha": 0.5}),
    "concat": concat_model,
    "sequential": sequential_model,
}


def randomized(name: str, seed: int = 0):
    """A zoo model with every weight random, BN statistics included (so a wrong slice shows)."""
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        vals = []
        for w in layer.weights:
            shape = tuple(w.shape)
            if w.name in ("gamma", "moving_variance"):
                vals.append(rng.uniform(0.5, 1.5, shape))
            elif w.name in ("beta", "moving_mean", "bias"):
                vals.append(rng.normal(0, 0.2, shape))
            else:
                vals.append(w.numpy())
        layer.set_weights([v.astype(np.float32) for v in vals])
    return model


def learner(**kw):
    return LEARNERS.get("channel_pruning")(learner_cfg("channel_pruning", **kw))


def images(model, n=8, seed=1):
    return np.random.default_rng(seed).random((n, *model.input_shape[1:]), dtype=np.float32)


def max_diff(a, b, x):
    return float(np.max(np.abs(M.predict(a, x) - M.predict(b, x))))


def zeroed_reference(model, graph, keep):
    """The original model with the pruned channels' kernel rows zeroed where they are read.

    Pruning channel c is exactly that, so the pruned model must compute the same function.
    """
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    for name, kind in graph.kinds.items():
        if kind not in (PRODUCER, SEPARABLE):
            continue
        mask = graph.in_mask(name, keep)
        if mask is None or mask.all():  # nothing read is pruned (a grouped conv's rows are C_in / groups)
            continue
        layer = ref.get_layer(name)
        first = layer.weights[0]  # kernel, or the separable's depthwise kernel
        k = first.numpy()
        k[..., ~mask, :] = 0.0
        first.assign(k)
    return ref


@pytest.mark.parametrize("name", list(MODELS))
def test_surgery_matches_zeroed_channels_and_full_ratio_is_identity(name):
    model = randomized(name)
    before = [w.copy() for w in model.get_weights()]
    g = analyse(model)
    assert g.prunable and not g.reasons
    x = images(model)
    full = learner().compress(model, {f"ratio/{gr.name}": 1.0 for gr in g.prunable}, None, Budget(epochs=0))
    assert max_diff(full.deploy, model, x) < 1e-5
    rng = np.random.default_rng(0)
    keep = {gr.id: np.sort(rng.permutation(gr.size)[:max(1, gr.size // 2)]) for gr in g.prunable}
    pruned = g.prune(model, keep)
    assert max_diff(pruned, zeroed_reference(model, g, keep), x) < 1e-4
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "input model modified"


@pytest.mark.parametrize("name", list(MODELS))
def test_half_ratio_costs_save_and_tflite(name, tmp_path):
    from pocketflow.export import to_tflite, verify_tflite
    model = randomized(name)
    lr = learner(preserve_ratio=0.5)
    g = lr.graph(model)
    params = lr.default_params(model)
    comp = lr.compress(model, params, None, Budget(epochs=0))
    counts = {gr.id: channels(0.5, gr.size, 1, 32) for gr in g.prunable}
    assert M.count_macs(comp.deploy) == g.macs(counts) < M.count_macs(model)
    assert M.count_params(comp.deploy) == g.params(counts)
    assert lr.measure(model, comp, "flops") == pytest.approx(lr.predict_ratio(model, params, "flops"), abs=0)
    assert comp.info["channels"] == {gr.name: [counts[gr.id], gr.size] for gr in g.prunable}
    path = tmp_path / "pruned.keras"
    comp.deploy.save(path)
    x = images(model)
    assert max_diff(keras.saving.load_model(path, compile=False), comp.deploy, x) < 1e-6
    assert verify_tflite(comp.deploy, to_tflite(comp.deploy), x) < 1e-4


def test_channel_counts_follow_the_tile_grid():
    assert list(allowed_counts(64, 1, 32)) == [*range(1, 17), 32, 64]
    assert list(allowed_counts(16, 1, 32)) == list(range(1, 17))
    assert list(allowed_counts(64, 8, 0)) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert list(allowed_counts(100, 1, 32)) == [*range(1, 17), 32, 64, 96, 100]
    assert list(allowed_counts(4, 8, 0)) == [4]  # a group narrower than the multiple stays whole
    assert channels(0.7, 64, 1, 32) == 32 and channels(0.76, 64, 1, 32) == 64  # 44.8 / 48.6 -> nearest
    assert channels(0.69, 16, 1, 32) == 11 and channels(0.7, 32, 1, 32) == 16
    assert channels(0.7, 64, 1, 0) == 45 and channels(0.01, 64, 1, 32) == 1 and channels(1.0, 64, 8, 32) == 64
    model = build_model("resnet20", (32, 32, 3), 10)
    for tile in (0, 32):
        lr = learner(channel_tile=tile)
        p = lr.project(model, lr.default_params(model), "flops", 2.0)
        counts = lr._counts(lr.graph(model), p)
        assert 2.0 <= lr.predict_ratio(model, p, "flops") <= 2.02
        on_grid = all(counts[gr.id] in allowed_counts(gr.size, 1, 32) for gr in lr.graph(model).prunable)
        assert on_grid or tile == 0
    # VGG-small's groups are all wider than 32: tile steps alone overshoot, single steps finish
    vgg = build_model("vgg_small", (32, 32, 3), 10)
    lr = learner()
    p = lr.project(vgg, lr.default_params(vgg), "flops", 2.0)
    assert 2.0 <= lr.predict_ratio(vgg, p, "flops") <= 2.02
    assert lr.measure(vgg, lr.compress(vgg, p, None, Budget(epochs=0)), "flops") == lr.predict_ratio(vgg, p, "flops")


class Doubler(L.Layer):
    """A custom layer: the analysis cannot know what it does to channels."""

    def call(self, x):
        return x * 2.0


def test_unsupported_layers_are_reported_and_the_rest_prunes(capsys):
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(8, 3, name="conv1")(inp)
    x = Doubler(name="doubler")(x)
    x = L.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = L.Lambda(lambda t: t + 1.0, name="plus_one")(x)
    x = L.Conv2D(8, 3, activation="relu", name="conv3")(x)
    x = L.Conv2D(8, 3, activation="relu", name="conv4")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, L.Dense(4, name="logits")(x))
    lr = learner(preserve_ratio=0.5)
    comp = lr.compress(model, lr.default_params(model), None, Budget(epochs=0))
    out = capsys.readouterr().out
    assert "doubler (Doubler)" in out and "plus_one (Lambda)" in out
    assert [gr.name for gr in lr.graph(model).prunable] == ["conv3", "conv4"]
    assert comp.info["channels"] == {"conv3": [4, 8], "conv4": [4, 8]}
    assert comp.deploy.get_layer("conv3").filters == 4 and comp.deploy.get_layer("conv2").filters == 8
    assert len(comp.info["skipped_layers"]) == 2


@pytest.mark.parametrize("criterion", ["l1", "l2", "reconstruction", "discrimination"])
def test_criteria_run_on_a_trained_model(criterion, trained_seed_cnn, small_data):
    model = trained_seed_cnn
    base = M.accuracy(model, small_data.x_test, small_data.y_test)
    lr = learner(criterion=criterion, preserve_ratio=0.5, calibration_images=256)
    comp = lr.compress(model, lr.default_params(model), small_data, Budget(steps=5))
    acc = M.accuracy(comp.deploy, small_data.x_test, small_data.y_test)
    assert comp.deploy.get_layer("conv").filters == 6
    assert acc > 0.5 * base, f"{criterion}: accuracy {acc:.3f} vs {base:.3f} before pruning"


@pytest.mark.parametrize("criterion", ["reconstruction", "discrimination"])
def test_data_driven_criteria_handle_residual_and_concat_groups(criterion, small_data):
    model = concat_model()
    lr = learner(criterion=criterion, preserve_ratio=0.5, calibration_images=64)
    comp = lr.compress(model, lr.default_params(model), small_data, Budget(epochs=0))
    assert np.isfinite(M.predict(comp.deploy, small_data.x_test[:8])).all()
    res = build_model("resnet20", (28, 28, 1), 10, {"widths": (8, 16, 16)})
    comp = lr.compress(res, lr.default_params(res), small_data, Budget(epochs=0))
    if criterion == "reconstruction":
        assert "logits" in comp.info["refit_layers"]
    else:
        assert len(comp.info["aux_heads"]) == 3


def test_project_meets_flops_target_within_one_percent():
    model = build_model("resnet20", (32, 32, 3), 10)
    lr = learner()
    g = lr.graph(model)
    space = lr.search_space(model)
    rng = np.random.default_rng(0)
    starts = [{k: 1.0 for k in space}, {k: 0.25 for k in space},  # from above and from over-compression
              {k: float(rng.uniform(d.low, d.high)) for k, d in space.items()}]
    for start in starts:
        p = lr.project(model, start, "flops", 2.0)
        assert 2.0 <= lr.predict_ratio(model, p, "flops") <= 2.02
        comp = lr.compress(model, p, None, Budget(epochs=0))
        assert lr.measure(model, comp, "flops") == pytest.approx(lr.predict_ratio(model, p, "flops"), abs=0)
    p = lr.project(model, lr.default_params(model), "params", 3.0)
    assert 3.0 <= lr.predict_ratio(model, p, "params") <= 3.03
    assert lr.max_ratio(model, "flops") > 10
    with pytest.raises(PocketFlowError, match="out of reach"):
        lr.project(model, lr.default_params(model), "flops", 1000.0)
    assert len(g.prunable) == 12 and g.group("stem").producers == ["stem", "s1b1_conv2", "s1b2_conv2", "s1b3_conv2"]


def test_latency_prediction_is_measured_and_cached():
    model = randomized("vgg_small")
    lr = learner()
    half = lr.default_params(model)
    r = lr.predict_ratio(model, half, "latency")
    assert r > 1.3
    n = len(lr._latency)
    assert lr.predict_ratio(model, half, "latency") == r and len(lr._latency) == n


def test_user_errors_are_one_line():
    with pytest.raises(ConfigError, match="criterion"):
        learner_cfg("channel_pruning", criterion="l3")
    with pytest.raises(ConfigError, match="ratio_range"):
        learner_cfg("channel_pruning", ratio_range=[0.5, 0.2])
    model = build_model("seed_cnn", (28, 28, 1), 10)
    with pytest.raises(PocketFlowError, match="did you mean 'ratio/conv'"):
        learner().predict_ratio(model, {"ratio/cnv": 0.5}, "flops")
    with pytest.raises(PocketFlowError, match="needs training images"):
        learner(criterion="reconstruction").compress(model, {}, None, Budget(epochs=0))


def test_cli_run_meets_target(tmp_path):
    cfg = tmp_path / "cp.yaml"
    cfg.write_text(f"""
name: cp
data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1}}
model: {{name: seed_cnn}}
train: {{epochs: 1, batch_size: 64, verbose: false}}
learner:
  name: channel_pruning
  criterion: l1
  fine_tune: {{epochs: 1, batch_size: 64, verbose: false}}
target: {{metric: flops, ratio: 2.0}}
export: {{formats: [keras, tflite]}}
""")
    proc = run_cli("run", cfg, "--output", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "cp" / "best" / "metrics.json").read_text())
    assert 2.0 <= metrics["ratios"]["flops"] <= 2.02
    assert metrics["exports"]["tflite"]["max_abs_diff_vs_keras"] < 1e-4




def test_cli_run_skips_unsupported_layers_by_name(tmp_path):
    """Item 4: a user's .keras model with a custom layer and a Lambda (loaded with --unsafe-load):
    each is reported by name on one line, its groups stay whole, the run finishes and exports."""
    Scale = user_layer_module(tmp_path, "pf_user_layers")
    inp = keras.Input((28, 28, 1))
    x = L.Conv2D(8, 3, name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = Scale(name="scale")(x)
    x = L.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = L.Lambda(lambda t: t * 0.5, name="halve")(x)
    x = L.Conv2D(16, 3, strides=2, activation="relu", name="conv3")(x)
    x = L.Conv2D(16, 3, activation="relu", name="conv4")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, L.Dense(10, name="logits")(x))
    model.save(tmp_path / "user.keras")
    cfg = tmp_path / "user.yaml"
    cfg.write_text(f"""
name: user
data: {{name: npz, path: {SMALL_NPZ}, val_split: 0.1, limit_train: 512}}
model: {{name: {tmp_path / 'user.keras'}, imports: [pf_user_layers]}}
learner:
  name: channel_pruning
  criterion: l1
  fine_tune: {{steps: 2, batch_size: 64, verbose: false}}
target: {{metric: flops, ratio: 1.3}}
export: {{formats: [keras, tflite]}}
""")
    proc = run_cli("run", cfg, "--output", tmp_path / "runs", "--unsafe-load", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("channel_pruning: skipped")]
    assert any("scale (Scale)" in line for line in skipped), proc.stdout[-2000:]
    assert any("halve (Lambda)" in line for line in skipped), proc.stdout[-2000:]
    metrics = json.loads((tmp_path / "runs" / "user" / "best" / "metrics.json").read_text())
    assert 1.3 <= metrics["ratios"]["flops"] <= 1.313
    assert (tmp_path / "runs" / "user" / "best" / "model.tflite").exists()
