"""Channel pruning's graph side: the topology walk, the layer-kind registry (a user's layer
declared with register_layer), squeeze-and-excitation blocks (Reshape) and EfficientNetB0."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import learner_cfg

keras = pytest.importorskip("keras")

from pocketflow.errors import PocketFlowError  # noqa: E402
from pocketflow.learners import LEARNERS, Budget, register_layer  # noqa: E402
from pocketflow.learners import topology  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402
from pocketflow.learners.topology import CHANNELWISE, OPAQUE, PASS, PRODUCER, walk  # noqa: E402
from test_channel_pruning import images, max_diff, zeroed_reference  # noqa: E402

L = keras.layers


class ChannelScale(L.Layer):
    """A user's per-channel layer: one weight of shape (C,)."""

    def build(self, shape):
        self.scale = self.add_weight(name="scale", shape=(shape[-1],), initializer="random_uniform")

    def call(self, x):
        return x * (1.0 + self.scale)


class Projection(L.Layer):
    """A user's Dense-like producer with its own weight names."""

    def __init__(self, units, **kw):
        super().__init__(**kw)
        self.units = units

    def build(self, shape):
        self.w = self.add_weight(name="w", shape=(shape[-1], self.units), initializer="glorot_uniform")
        self.b = self.add_weight(name="b", shape=(self.units,), initializer="random_normal")

    def call(self, x):
        return x @ self.w + self.b

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class Halve(L.Layer):
    """Changes the channel count: declaring it `pass` is a mistake the analysis must catch."""

    def call(self, x):
        return x[..., ::2]


@pytest.fixture
def registry():
    """The registry as it was before the test (registrations are global)."""
    topology._builtins()
    before = dict(topology._REGISTRY)
    yield
    topology._REGISTRY.clear()
    topology._REGISTRY.update(before)


def learner(**kw):
    return LEARNERS.get("channel_pruning")(learner_cfg("channel_pruning", **kw))


def custom_model():
    inp = keras.Input((12, 12, 3))
    x = L.Conv2D(8, 3, name="conv1")(inp)
    x = ChannelScale(name="scale")(x)
    x = L.ReLU(name="relu")(x)
    x = Projection(6, name="proj")(x)
    x = L.Conv2D(8, 3, name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(4, name="logits")(x))


def keep_half(g):
    rng = np.random.default_rng(0)
    return {gr.id: np.sort(rng.permutation(gr.size)[:max(1, gr.size // 2)]) for gr in g.prunable}


def assert_surgery_exact(model, g):
    """Keep-all surgery reproduces the model; pruning equals zeroing the pruned channels' readers."""
    x = images(model)
    assert max_diff(g.prune(model, g.full_keep()), model, x) <= 1e-5
    keep = keep_half(g)
    assert max_diff(g.prune(model, keep), zeroed_reference(model, g, keep), x) < 1e-4


def test_walk_lists_nodes_in_order_with_their_readers():
    inp = keras.Input((8, 8, 3), name="in")
    a = L.Conv2D(4, 1, name="a")(inp)
    b = L.Conv2D(4, 1, name="b")(a)
    s = L.Add(name="add")([a, b])
    model = keras.Model(inp, L.Flatten(name="flat")(s))
    topo = walk(model)
    names = [n.layer.name for n in topo.nodes]
    assert names == ["in", "a", "b", "add", "flat"]
    for i, n in enumerate(topo.nodes):
        assert all(names.index(src) < i for src in n.inbound)
    assert topo.consumers["a"] == ["b", "add"] and topo.consumers["flat"] == []
    assert topo.nodes[3].inbound == ["a", "b"] and topo.calls == dict.fromkeys(names, 1)
    seq = keras.Sequential([L.Dense(3)])
    with pytest.raises(PocketFlowError, match="not built"):
        walk(seq)


def test_custom_layers_are_opaque_until_registered(registry):
    keras.utils.set_random_seed(0)
    model = custom_model()
    g = analyse(model)
    assert g.kinds["scale"] == OPAQUE and g.kinds["proj"] == OPAQUE
    assert [gr.name for gr in g.prunable] == ["conv2"]
    assert any(r.startswith("scale (ChannelScale)") and "register_layer" in r for r in g.reasons)

    register_layer(ChannelScale, kind="channelwise")
    register_layer(Projection, kind="producer", weights={"w": {-2: "in", -1: "out"}, "b": {-1: "out"}},
                   width="units")
    g = analyse(model)
    assert not g.reasons and g.kinds["scale"] == CHANNELWISE and g.kinds["proj"] == PRODUCER
    assert [gr.name for gr in g.prunable] == ["conv1", "proj", "conv2"]
    assert g.group("conv1").members == ["scale"] and g.group("conv1").consumers == ["proj"]
    assert_surgery_exact(model, g)
    comp = learner(preserve_ratio=0.5).compress(model, {}, None, Budget(epochs=0))
    new = comp.deploy
    assert new.get_layer("scale").scale.shape == (4,) and new.get_layer("proj").w.shape == (4, 3)
    assert new.get_layer("proj").units == 3 and new.get_layer("conv2").kernel.shape[2] == 3
    register_layer(L.ReLU, kind="opaque")  # a user's entry replaces a built-in one
    g = analyse(model)
    assert "relu (ReLU): ReLU is registered as opaque; channels next to it are kept" in g.reasons
    assert [gr.name for gr in g.prunable] == ["proj", "conv2"]  # conv1's channels meet the ReLU


def test_a_wrong_registration_is_pinned_not_a_crash(registry):
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, name="conv1")(inp)
    x = Halve(name="halve")(x)
    x = L.Conv2D(8, 3, name="conv2")(x)
    model = keras.Model(inp, L.Dense(2, name="logits")(L.Flatten()(x)))
    register_layer(Halve, kind="pass")
    g = analyse(model)
    assert g.kinds["halve"] == OPAQUE and not g.group("conv1").prunable
    assert any("halve (Halve): its 8 input channels come out as 4" in r for r in g.reasons)
    assert_surgery_exact(model, g)
    with pytest.raises(PocketFlowError, match="kind 'scale'"):
        register_layer(Halve, kind="scale")


def test_an_exception_in_the_analysis_pins_that_layer(registry):
    def broken(layer, ins, outs):
        raise RuntimeError("boom")
    register_layer(ChannelScale, kind="channelwise", check=broken)
    g = analyse(custom_model())
    assert any(r.startswith("scale (ChannelScale): analysis failed (RuntimeError: boom)") for r in g.reasons)
    assert g.kinds["scale"] == OPAQUE and g.kinds["conv2"] == PRODUCER


def se_model(flat_target=-1):
    """Squeeze-and-excitation: GlobalAveragePooling -> Reshape(1, 1, C) -> Conv -> Conv -> Multiply;
    and a Reshape that flattens with an explicit target shape."""
    inp = keras.Input((16, 16, 3))
    x = L.Conv2D(16, 3, padding="same", name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Activation("swish", name="act1")(x)
    s = L.GlobalAveragePooling2D(name="se_squeeze")(x)
    s = L.Reshape((1, 1, 16), name="se_reshape")(s)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="se_excite")([x, s])
    x = L.Conv2D(8, 3, strides=2, name="conv2")(x)
    x = L.Reshape((8 * 7 * 7 if flat_target is None else flat_target,), name="flat")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x), name="se_net")


@pytest.mark.parametrize("flat_target", [-1, None])
def test_squeeze_and_excitation_prunes_through_reshape(flat_target):
    keras.utils.set_random_seed(0)
    model = se_model(flat_target)
    g = analyse(model)
    assert not g.reasons and g.kinds["se_reshape"] == PASS
    assert g.group("conv1").producers == ["conv1", "se_expand"]
    assert sorted(g.group("conv1").consumers) == ["conv2", "se_reduce"]
    assert_surgery_exact(model, g)
    lr = learner()
    p = lr.project(model, lr.default_params(model), "flops", 1.5)
    comp = lr.compress(model, p, None, Budget(epochs=0))
    assert lr.measure(model, comp, "flops") == lr.predict_ratio(model, p, "flops") >= 1.5
    kept = comp.info["channels"]["conv1"][0]
    assert comp.deploy.get_layer("se_reshape").target_shape == (1, 1, kept)


def test_reshape_that_moves_channels_is_pinned_with_a_reason():
    inp = keras.Input((4, 4, 8))
    x = L.Conv2D(8, 1, name="conv1")(inp)
    x = L.Reshape((4, 32), name="mix")(x)
    model = keras.Model(inp, L.Dense(2, name="logits")(x))
    g = analyse(model)
    assert g.kinds["mix"] == OPAQUE and not g.group("conv1").prunable
    assert any("mix (Reshape): Reshape moves channels between axes" in r for r in g.reasons)


@pytest.mark.slow  # ~15 s: EfficientNetB0 is built, cloned and pruned at 32x32
def test_efficientnet_b0_prunes_without_a_traceback(capsys):
    keras.utils.set_random_seed(0)
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    lr = learner(latency_aware=False)
    g = lr.graph(model)
    out = capsys.readouterr().out
    assert "skipped rescaling (Rescaling)" in out and "skipped normalization (Normalization)" in out
    assert len(g.prunable) > 30 and g.kinds["block2a_se_reshape"] == PASS
    x = images(model, n=4)
    assert max_diff(g.prune(model, g.full_keep()), model, x) <= 1e-5
    p = lr.project(model, lr.default_params(model), "flops", 2.0)
    comp = lr.compress(model, p, None, Budget(epochs=0))
    assert 2.0 <= lr.measure(model, comp, "flops") <= 2.02
    new = comp.deploy.get_layer
    kept = new("block2a_dwconv").output.shape[-1]
    assert new("block2a_se_reshape").target_shape[-1] == new("block2a_se_expand").filters == kept
    assert np.isfinite(comp.deploy.predict(x, verbose=0)).all()
