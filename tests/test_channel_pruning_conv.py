"""Channel pruning through the other convolutions: separable (with a depth multiplier, 1-D and
2-D), Conv1D models, and grouped convolutions, whose output channels prune in every block alike
while the channels they read are kept (pinned with that reason)."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pocketflow import metrics as M  # noqa: E402
from pocketflow.learners import Budget  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402
from pocketflow.learners.topology import PRODUCER, SEPARABLE  # noqa: E402
from test_channel_pruning_graph import assert_surgery_exact, learner  # noqa: E402
from test_channel_pruning_se import randomized  # noqa: E402

L = keras.layers


def separable_net(dims: int):
    """Conv -> separable (depth_multiplier 2) -> BN -> separable -> pooling -> logits."""
    conv, sep, pool = ((L.Conv1D, L.SeparableConv1D, L.GlobalAveragePooling1D) if dims == 1 else
                       (L.Conv2D, L.SeparableConv2D, L.GlobalAveragePooling2D))
    inp = keras.Input((16, 4) if dims == 1 else (12, 12, 3))
    x = conv(8, 3, padding="same", activation="relu", name="conv1")(inp)
    x = sep(12, 3, depth_multiplier=2, padding="same", name="sep1")(x)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    x = sep(10, 3, strides=2, name="sep2")(x)
    return keras.Model(inp, L.Dense(3, name="logits")(pool(name="gap")(x)), name=f"sep{dims}d")


def grouped_net(dims: int = 2):
    """ResNeXt-style: 1x1 -> grouped 3x3 (4 groups) -> BN -> 1x1, a residual Add, and a grouped
    conv reading a grouped conv's output."""
    conv, pool = (L.Conv1D, L.GlobalAveragePooling1D) if dims == 1 else (L.Conv2D, L.GlobalAveragePooling2D)
    inp = keras.Input((16, 4) if dims == 1 else (10, 10, 3))
    x = conv(16, 3, padding="same", name="stem")(inp)
    y = conv(8, 1, activation="relu", name="reduce")(x)
    y = conv(16, 3, padding="same", groups=4, name="grouped")(y)
    y = L.BatchNormalization(name="grouped_bn")(y)
    y = L.ReLU(name="grouped_relu")(y)
    y = conv(16, 1, name="expand")(y)
    x = L.Add(name="add")([x, y])
    x = conv(8, 3, groups=2, name="g2")(x)
    x = conv(8, 3, groups=4, name="g3")(x)
    return keras.Model(inp, L.Dense(3, name="logits")(pool(name="gap")(x)), name=f"grouped{dims}d")


def analysed(build, dims: int):
    """A randomized model (BN statistics too) and its channel graph."""
    keras.utils.set_random_seed(0)
    model = randomized(build(dims))
    return model, analyse(model)


@pytest.mark.parametrize("dims", [1, 2])
def test_separable_convolutions_prune_with_a_depth_multiplier(dims):
    model, g = analysed(separable_net, dims)
    assert not g.reasons and g.kinds["sep1"] == SEPARABLE
    assert [gr.name for gr in g.prunable] == ["conv1", "sep1", "sep2"]
    assert g.group("conv1").consumers == ["sep1"] and g.group("sep1").members == ["bn1"]
    assert_surgery_exact(model, g)
    comp = learner(preserve_ratio=0.5).compress(model, {}, None, Budget(epochs=0))
    sep1 = comp.deploy.get_layer("sep1")
    assert sep1.depthwise_kernel.shape[-2:] == (4, 2) and sep1.pointwise_kernel.shape[-2:] == (8, 6)


@pytest.mark.parametrize("dims", [1, 2])
def test_grouped_convolutions_prune_their_outputs_in_every_block(dims):
    model, g = analysed(grouped_net, dims)
    assert not g.reasons and g.kinds["grouped"] == PRODUCER
    grouped = g.group("grouped")
    assert grouped.prunable and grouped.size == 4 and grouped.members == ["grouped_bn"]
    assert grouped.consumers == ["expand"]
    assert not g.group("reduce").prunable and "read by grouped convolution grouped" in g.group("reduce").pinned
    assert not g.group("stem").prunable and not g.group("g2").prunable  # both read by grouped convs
    assert_surgery_exact(model, g)
    lr = learner(latency_aware=False)
    p = lr.project(model, lr.default_params(model), "params", 1.3)
    comp = lr.compress(model, p, None, Budget(epochs=0))
    kept = comp.info["channels"]["grouped"][0]
    new = comp.deploy.get_layer("grouped")
    assert new.filters == 4 * kept and tuple(new.kernel.shape[-2:]) == (2, 4 * kept) and new.groups == 4
    assert lr.measure(model, comp, "params") == lr.predict_ratio(model, p, "params") >= 1.3
    assert M.count_macs(comp.deploy) == lr.graph(model).macs(lr._counts(lr.graph(model), p))
