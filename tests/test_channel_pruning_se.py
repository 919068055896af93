"""Channel pruning through squeeze-and-excitation: a Reshape that only adds unit axes to a
channel vector keeps the channel axis, a broadcasting Multiply ties the gate's channels to the
feature map's, the squeeze layer's own channels are an inner group. EfficientNetB0 (whose SE
blocks are these) lives in test_channel_pruning_graph."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pocketflow.learners import Budget  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402
from pocketflow.learners.topology import OPAQUE, PASS  # noqa: E402
from test_channel_pruning import images, max_diff, zeroed_reference  # noqa: E402
from test_channel_pruning_graph import assert_surgery_exact, learner  # noqa: E402

L = keras.layers


def se_net(variant: str):
    """conv -> SE gate -> Multiply -> conv -> logits; the gate as EfficientNet builds it ("conv"),
    with Reshape((1, 1, -1)) ("minus_one"), from Dense layers ("dense"), with the Multiply's inputs
    swapped ("swapped"), or through a 1-D feature map ("conv1d")."""
    one_d = variant == "conv1d"
    inp = keras.Input((12, 6) if one_d else (10, 10, 3))
    conv, pool = (L.Conv1D, L.GlobalAveragePooling1D) if one_d else (L.Conv2D, L.GlobalAveragePooling2D)
    x = conv(12, 3, padding="same", name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Activation("swish", name="act1")(x)
    s = pool(name="squeeze")(x)
    unit = (1,) if one_d else (1, 1)
    if variant == "dense":
        s = L.Dense(5, activation="relu", name="se_reduce")(s)
        s = L.Dense(12, activation="sigmoid", name="se_expand")(s)
        s = L.Reshape((*unit, 12), name="se_reshape")(s)
    else:
        s = L.Reshape((*unit, -1 if variant == "minus_one" else 12), name="se_reshape")(s)
        s = conv(5, 1, activation="relu", name="se_reduce")(s)
        s = conv(12, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="excite")([s, x] if variant == "swapped" else [x, s])
    x = conv(8, 3, strides=2, name="conv2")(x)
    x = pool(name="gap")(x)
    return keras.Model(inp, L.Dense(4, name="logits")(x), name=f"se_{variant}")


def randomized(model, seed=0):
    """BN statistics and biases random too, so a wrong slice changes the outputs."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        if w.name in ("gamma", "moving_variance"):
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype(np.float32))
        elif w.name in ("beta", "moving_mean", "bias"):
            w.assign(rng.normal(0, 0.3, w.shape).astype(np.float32))
    return model


VARIANTS = ["conv", "minus_one", "dense", "swapped", "conv1d"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_se_gate_is_followed_and_the_squeeze_is_an_inner_group(variant):
    keras.utils.set_random_seed(0)
    model = randomized(se_net(variant))
    g = analyse(model)
    assert not g.reasons, g.reasons
    assert g.kinds["se_reshape"] == PASS
    feat, inner = g.group("conv1"), g.group("se_reduce")
    assert feat.prunable and sorted(feat.producers) == ["conv1", "se_expand"]
    assert sorted(feat.consumers) == ["conv2", "se_reduce"] and feat.members == ["bn1"]
    assert inner.prunable and inner.size == 5 and inner.consumers == ["se_expand"]
    assert_surgery_exact(model, g)
    x = images(model)
    for group in (feat, inner):  # each group alone: the rest of the model stays whole
        keep = {**g.full_keep(), group.id: np.array([0, 2, 3])}
        pruned = g.prune(model, keep)
        assert max_diff(pruned, zeroed_reference(model, g, keep), x) < 1e-4
    pruned = g.prune(model, {**g.full_keep(), feat.id: np.arange(7)})
    if variant != "minus_one":  # an explicit width follows the kept channels; -1 is left to Keras
        assert pruned.get_layer("se_reshape").target_shape[-1] == 7
    assert pruned.get_layer("se_expand").get_config()["units" if variant == "dense" else "filters"] == 7


def test_se_net_prunes_at_a_flops_target():
    keras.utils.set_random_seed(0)
    model = se_net("conv")
    lr = learner(latency_aware=False)
    p = lr.project(model, lr.default_params(model), "flops", 2.0)
    comp = lr.compress(model, p, None, Budget(epochs=0))
    assert 2.0 <= lr.measure(model, comp, "flops") == lr.predict_ratio(model, p, "flops")
    assert np.isfinite(comp.deploy.predict(images(model), verbose=0)).all()


def test_a_reshape_that_splits_the_channel_vector_is_pinned_with_a_reason():
    inp = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="conv1")(inp)
    s = L.GlobalAveragePooling2D(name="squeeze")(x)
    s = L.Reshape((4, 4, 1), name="split")(s)  # channels become a spatial map
    s = L.Conv2D(1, 3, padding="same", activation="sigmoid", name="spatial")(s)
    s = L.Reshape((1, 1, 16), name="back")(s)
    x = L.Multiply(name="excite")([x, s])
    x = L.Conv2D(8, 3, name="conv2")(x)
    model = keras.Model(inp, L.Dense(2, name="logits")(L.GlobalAveragePooling2D(name="gap")(x)))
    g = analyse(model)
    assert g.kinds["split"] == OPAQUE and not g.group("conv1").prunable
    assert any(r.startswith("split (Reshape): Reshape moves channels between axes") for r in g.reasons)
    assert [gr.name for gr in g.prunable] == ["conv2"]
    assert_surgery_exact(model, g)
