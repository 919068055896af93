"""Channel pruning through nested models (a backbone used as one layer: transfer learning):
the analysis sees the backbone's layers, the pruned model keeps the nested structure, and a
nested model that cannot be followed is one opaque layer with a reason."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pocketflow.learners import Budget  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402
from pocketflow.learners.topology import OPAQUE, PRODUCER  # noqa: E402
from test_channel_pruning import images, max_diff, zeroed_reference  # noqa: E402
from test_channel_pruning_graph import keep_half, learner  # noqa: E402
from test_channel_pruning_se import randomized  # noqa: E402

L = keras.layers


def conv_block(prefix, shape=(16, 16, 3)):
    return keras.Sequential([keras.Input(shape), L.Conv2D(8, 3, padding="same", name=f"{prefix}_c1"),
                             L.BatchNormalization(name=f"{prefix}_bn1"), L.ReLU(name=f"{prefix}_r1"),
                             L.Conv2D(12, 3, strides=2, name=f"{prefix}_c2"),
                             L.BatchNormalization(name=f"{prefix}_bn2"), L.ReLU(name=f"{prefix}_r2")],
                            name=f"{prefix}_base")


def functional_backbone():
    """A functional backbone holding a Sequential block and a residual Add."""
    inp = keras.Input((16, 16, 3), name="bb_in")
    x = conv_block("inner")(inp)
    y = L.Conv2D(12, 1, name="bb_c3")(x)
    x = L.Add(name="bb_add")([x, L.BatchNormalization(name="bb_bn3")(y)])
    return keras.Model(inp, x, name="backbone")


def transfer(base, training=None, shape=(16, 16, 3)):
    """The transfer-learning pattern: `base(inp)`, pooling, a new head."""
    inp = keras.Input(shape, name="image")
    y = base(inp) if training is None else base(inp, training=training)
    y = L.Conv2D(10, 1, name="head_conv")(y)
    y = L.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(inp, L.Dense(4, name="logits")(y), name="transfer")


def assert_pruned_through(model, g, x):
    """The inlined model computes the original; keep-all surgery reproduces it; pruning half of
    each group equals zeroing those channels' readers."""
    assert max_diff(g.model, model, x) <= 1e-6
    full = g.prune(model, g.full_keep())
    assert max_diff(full, model, x) <= 1e-5
    keep = keep_half(g)
    pruned = g.prune(model, keep)
    assert max_diff(pruned, zeroed_reference(g.model, g, keep), x) < 1e-4
    return pruned


@pytest.mark.parametrize("case", ["sequential", "functional", "frozen"])
def test_a_nested_model_is_pruned_through_and_kept_nested(case, tmp_path):
    keras.utils.set_random_seed(0)
    base = conv_block("seq") if case == "sequential" else functional_backbone()
    if case == "frozen":
        base.trainable = False
    model = randomized(transfer(base, training=False if case == "frozen" else None))
    g = analyse(model)
    assert not g.reasons, g.reasons
    first = "seq_c1" if case == "sequential" else "inner_c1"
    assert g.kinds[first] == PRODUCER and g.group(first).prunable and base.name in g.inlined
    x = images(model)
    pruned = assert_pruned_through(model, g, x)
    new_base = pruned.get_layer(base.name)
    assert type(new_base) is type(base) and [type(v) for v in pruned.layers] == [type(v) for v in model.layers]
    conv = (new_base if case == "sequential" else new_base.get_layer("inner_base")).get_layer(first)
    assert conv.filters == 4 and new_base.trainable == (case != "frozen")
    assert pruned.get_layer("head_conv").trainable_weights  # the head still trains
    if case == "frozen":
        assert not new_base.trainable_weights and not conv.trainable
    pruned.save(tmp_path / "pruned.keras")
    assert max_diff(keras.saving.load_model(tmp_path / "pruned.keras", compile=False), pruned, x) < 1e-6


def test_nested_models_that_cannot_be_followed_are_opaque_with_a_reason():
    keras.utils.set_random_seed(0)
    shared = conv_block("twice")
    inp = keras.Input((16, 16, 3))
    a, b = shared(inp), shared(L.Conv2D(3, 1, name="pre")(inp))
    clash = keras.Sequential([keras.Input((7, 7, 12)), L.Conv2D(12, 1, name="pre")], name="clash")
    y = clash(L.Add(name="add")([a, b]))
    model = keras.Model(inp, L.Dense(3, name="logits")(L.GlobalAveragePooling2D(name="gap")(y)))
    g = analyse(model)
    assert g.kinds["twice_base"] == OPAQUE and g.kinds["clash"] == OPAQUE and not g.inlined
    for why in ("twice_base (Sequential): nested model called 2 times",
                "clash (Sequential): nested model whose layer name 'pre' is used more than once"):
        assert any(r.startswith(why) for r in g.reasons), g.reasons
    assert not g.prunable
    assert max_diff(g.prune(model, g.full_keep()), model, images(model)) <= 1e-5


def test_subclassed_and_unknown_size_nested_models_are_opaque_with_a_reason():
    class Block(keras.Model):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.conv = L.Conv2D(8, 3)

        def call(self, x):
            return self.conv(x)

    any_size = keras.Input((None, None, 3))
    unsized = keras.Model(any_size, L.Conv2D(8, 3, name="u1")(any_size), name="unsized")
    for block, why in [(Block(name="block"), "block (Block): nested model of class Block"),
                       (unsized, "unsized (Functional): nested model built for inputs of unknown size")]:
        inp = keras.Input((8, 8, 3))
        y = block(L.Conv2D(3, 1, name="pre")(inp))
        y = L.Conv2D(6, 1, name="post")(y)
        model = keras.Model(inp, L.Dense(2, name="logits")(L.GlobalAveragePooling2D()(y)))
        g = analyse(model)
        assert any(r.startswith(why) for r in g.reasons), g.reasons
        assert [gr.name for gr in g.prunable] == ["post"] and not g.inlined
        assert max_diff(g.prune(model, g.full_keep()), model, images(model)) <= 1e-5


def test_a_backbone_prunes_with_the_data_driven_criterion(small_data):
    keras.utils.set_random_seed(0)
    model = transfer(functional_backbone_28(), shape=small_data.input_shape)
    comp = learner(criterion="reconstruction", calibration_images=64, preserve_ratio=0.5).compress(
        model, {}, small_data, Budget(epochs=0))
    assert comp.deploy.get_layer("b28").get_layer("b28_c1").filters == 4
    assert np.isfinite(comp.deploy.predict(small_data.x_test[:8], verbose=0)).all()


def functional_backbone_28():
    inp = keras.Input((28, 28, 1))
    x = L.Conv2D(8, 3, activation="relu", name="b28_c1")(inp)
    x = L.Conv2D(12, 3, strides=2, activation="relu", name="b28_c2")(x)
    return keras.Model(inp, x, name="b28")


@pytest.mark.slow  # ~20 s: MobileNetV2 (alpha 0.35) is built, inlined, cloned and pruned at 32x32
def test_mobilenet_v2_backbone_prunes_at_2x_flops():
    keras.utils.set_random_seed(0)
    base = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)
    model = transfer(base, shape=(32, 32, 3))
    lr = learner(latency_aware=False)
    g = lr.graph(model)
    assert not g.reasons and len(g.prunable) > 20 and base.name in g.inlined
    x = images(model, n=4)
    assert max_diff(g.prune(model, g.full_keep()), model, x) <= 1e-5
    p = lr.project(model, lr.default_params(model), "flops", 2.0)
    comp = lr.compress(model, p, None, Budget(epochs=0))
    assert 2.0 <= lr.measure(model, comp, "flops") == lr.predict_ratio(model, p, "flops") <= 2.02
    assert isinstance(comp.deploy.get_layer(base.name), keras.Model)
    assert np.isfinite(comp.deploy.predict(x, verbose=0)).all()
