"""The custom-layer example (learners/examples/custom_layers.py) passes the checks the built-in
layers pass, with no change to the library: channel pruning through both layers (keep-all
surgery exact, pruned equals the masked original, the result saves and reloads), and weight
sparsity and uniform quantization reach GainConv2D's kernel."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import learner_cfg

keras = pytest.importorskip("keras")

from pocketflow.errors import PocketFlowError  # noqa: E402
from pocketflow.export import to_tflite  # noqa: E402
from pocketflow.learners import LEARNERS, Budget, register_layer  # noqa: E402
from pocketflow.learners.channel_pruning.groups import analyse  # noqa: E402
from pocketflow.learners.examples.custom_layers import ChannelScale, GainConv2D  # noqa: E402
from pocketflow.learners.kernels import is_kernel_layer  # noqa: E402
from pocketflow.learners.topology import CHANNELWISE, PRODUCER  # noqa: E402
from pocketflow.metrics import TFLiteRunner  # noqa: E402
from test_channel_pruning import images, max_diff, zeroed_reference  # noqa: E402

L = keras.layers


def custom_net(input_shape=(28, 28, 1), classes=10):
    """conv -> scale -> relu twice (the second strided), GAP, Dense; random gains and scales."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(input_shape)
    x = GainConv2D(16, name="conv1")(inp)
    x = L.ReLU(name="relu1")(ChannelScale(name="scale1")(x))
    x = GainConv2D(16, strides=2, name="conv2")(x)
    x = L.ReLU(name="relu2")(ChannelScale(name="scale2")(x))
    model = keras.Model(inp, L.Dense(classes, name="logits")(L.GlobalAveragePooling2D(name="gap")(x)))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, (GainConv2D, ChannelScale)):
            layer.set_weights([w + rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in layer.get_weights()])
    return model


def test_channel_pruning_follows_the_custom_layers():
    model = custom_net()
    g = analyse(model)
    assert not g.reasons, g.reasons
    assert g.kinds["conv1"] == g.kinds["conv2"] == PRODUCER and g.kinds["scale1"] == CHANNELWISE
    assert [gr.name for gr in g.prunable] == ["conv1", "conv2"]
    assert g.group("conv1").members == ["scale1"] and g.group("conv1").consumers == ["conv2"]
    x = images(model)
    assert max_diff(g.prune(model, g.full_keep()), model, x) <= 1e-5
    keep = {gr.id: np.sort(np.random.default_rng(gr.id).permutation(gr.size)[:gr.size // 2]) for gr in g.prunable}
    assert max_diff(g.prune(model, keep), zeroed_reference(model, g, keep), x) < 1e-4


def test_pruned_custom_model_saves_reloads_and_converts(tmp_path):
    model = custom_net()
    lr = LEARNERS.get("channel_pruning")(learner_cfg("channel_pruning", preserve_ratio=0.5))
    new = lr.compress(model, {}, None, Budget(epochs=0)).deploy
    assert new.get_layer("conv1").kernel.shape == (3, 3, 1, 8) and new.get_layer("conv2").kernel.shape == (3, 3, 8, 8)
    assert new.get_layer("scale1").gamma.shape == (8,) and new.get_layer("conv2").gain.shape == (8,)
    path = tmp_path / "pruned.keras"
    new.save(path)
    back = keras.saving.load_model(path)
    x = images(model)
    assert max_diff(back, new, x) == 0.0
    tfl = TFLiteRunner(to_tflite(back), batch=len(x))(x)
    assert np.max(np.abs(tfl - new.predict(x, verbose=0))) < 1e-4


@pytest.mark.parametrize("name,value", [("weight_sparsity", 0.75), ("uniform_quant", 4)])
def test_sparsity_and_quantization_reach_the_custom_kernel(name, value, small_data, tmp_path):
    model = custom_net(small_data.input_shape, small_data.num_classes)
    assert is_kernel_layer(model.get_layer("conv1")) and not is_kernel_layer(model.get_layer("scale1"))
    lr = LEARNERS.get(name)(learner_cfg(name, fine_tune={"verbose": False, "steps": 2, "batch_size": 32}))
    dims = {k: value for k in lr.default_params(model)}
    assert {k.split("/", 1)[1] for k in dims} >= {"conv1", "conv2"}, dims
    comp = lr.compress(model, dims, small_data, Budget(steps=2))
    deploy = comp.deploy
    for layer in ("conv1", "conv2"):
        k = deploy.get_layer(layer).kernel.numpy()
        if name == "weight_sparsity":
            assert np.mean(k == 0) >= 0.74, (layer, np.mean(k == 0))
        else:  # per output channel at most 2^4 levels
            assert max(len(np.unique(k[..., c])) for c in range(k.shape[-1])) <= 16
    x = small_data.x_test[:8]
    path = tmp_path / "m.keras"
    deploy.save(path)
    assert max_diff(keras.saving.load_model(path), deploy, x) == 0.0


def test_a_compressible_kernel_needs_its_forward_pass():
    with pytest.raises(PocketFlowError, match="kernel= and forward="):
        register_layer(GainConv2D, "producer", kernel="kernel")


def test_a_conv_subclass_with_its_own_call_is_not_wrapped_unless_registered():
    class Doubled(L.Conv2D):
        def call(self, x):
            return 2.0 * super().call(x)
    assert is_kernel_layer(L.Conv2D(4, 3)) and not is_kernel_layer(Doubled(4, 3))
