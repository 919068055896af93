"""`TransformTestCase`: the contract every kernel transform keeps (in the spirit of Keras's
`run_layer_test`), checked on a small model whose kernel layers are wrapped with it.

Subclass it in a pytest module under a `Test...` name and give the transforms to add; pytest
runs every check below:

    class TestMyQuant(TransformTestCase):
        def make_transforms(self, name, layer, existing):
            return [MyQuant(bits=4, depthwise=is_depthwise(layer))]

        def check_kernel(self, name, kernel, effective):   # what the transform guarantees
            assert len(np.unique(effective)) <= 16

Checks: a forward pass (finite, deterministic, the transform's own guarantee), a `.keras` save
and load giving identical outputs, `get_config` / `from_config` and the `pocketflow>` Keras
names, gradients reaching the kernel (and the transforms' trainable state), and `strip_model`
giving a plain model with the same outputs and the transformed kernels baked in.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import keras
import numpy as np

from pocketflow.learners.kernels import kernel_variable
from pocketflow.learners.transforms import PKG, ActivationQuant, KernelTransform, PooledQuant
from pocketflow.learners.wrap import (KernelWrapper, activation_quants, all_layers, calibrate_activations,
                                      strip_model, wrap_model, wrappers)


@contextlib.contextmanager
def float_activations(model):
    """Activation fake quants pass values through (as uncalibrated) inside the block: the
    wrapped model then computes what its stripped, float copy computes."""
    quants = activation_quants(model)
    seen = [q.seen.numpy() for q in quants]
    for q in quants:
        q.seen.assign(0.0)
    try:
        yield
    finally:
        for q, s in zip(quants, seen):
            q.seen.assign(s)


class TransformTestCase:
    """Override `make_transforms` and `check_kernel`; optionally `output_bits` (activation fake
    quant), `prepare` (state a trained model would have, e.g. a mask's sparsity), `check_model`
    and `build_model` (default: Conv2D+ReLU -> max pool -> DepthwiseConv2D -> Dense)."""

    #: activation fake-quant bits of the wrapped layers (None: none)
    output_bits: int | None = None
    seed = 0

    # -- what a subclass provides ---------------------------------------------------------------
    def make_transforms(self, name: str, layer, existing: list) -> list:
        """The transforms to append to layer `name` (as `wrap_model` asks for them)."""
        raise NotImplementedError

    def check_kernel(self, name: str, kernel: np.ndarray, effective: np.ndarray) -> None:
        """Assert what the transforms guarantee about a layer's transformed kernel."""
        raise NotImplementedError

    def check_model(self, wrapped, x: np.ndarray) -> None:
        """Assert model-level guarantees (e.g. quantized outputs). Default: none."""

    def prepare(self, wrapped, x: np.ndarray) -> None:
        """Bring the transforms to the state training would leave them in. Default: calibrate
        the activation ranges (nothing without activation quants)."""
        calibrate_activations(wrapped, x)

    def build_model(self):
        inp = keras.Input((8, 8, 3), name="img")
        h = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
        h = keras.layers.MaxPooling2D(2, name="pool")(h)
        h = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(h)
        h = keras.layers.Flatten(name="flat")(h)
        return keras.Model(inp, keras.layers.Dense(5, name="fc")(h), name="conformance")

    # -- set-up ---------------------------------------------------------------------------------
    def wrapped(self):
        """(plain model, wrapped model in its prepared state, inputs)."""
        keras.utils.set_random_seed(self.seed)
        plain = self.build_model()
        bits = (lambda n: self.output_bits) if self.output_bits else None
        wrapped = wrap_model(plain, lambda n: True, self.make_transforms, bits)
        x = np.random.default_rng(self.seed).normal(size=(32, *plain.input_shape[1:])).astype(np.float32)
        self.prepare(wrapped, x)
        return plain, wrapped, x

    @staticmethod
    def outputs(model, x) -> np.ndarray:
        return np.asarray(model(x, training=False))

    # -- the checks -----------------------------------------------------------------------------
    def test_forward(self):
        plain, wrapped, x = self.wrapped()
        assert wrappers(wrapped), "no kernel layer was wrapped"
        y = self.outputs(wrapped, x)
        assert y.shape == self.outputs(plain, x).shape and np.all(np.isfinite(y))
        np.testing.assert_array_equal(self.outputs(wrapped, x), y)  # inference is deterministic
        for w in wrappers(wrapped):
            self.check_kernel(w.name, kernel_variable(w.layer).numpy(), w.effective_kernel())
        self.check_model(wrapped, x)

    def test_keras_round_trip(self):
        _, wrapped, x = self.wrapped()
        with tempfile.TemporaryDirectory() as d:
            wrapped.save(Path(d) / "m.keras")
            loaded = keras.saving.load_model(Path(d) / "m.keras")
        assert [type(layer) for layer in all_layers(loaded)] == [type(layer) for layer in all_layers(wrapped)]
        for a, b in zip(wrapped.weights, loaded.weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
        np.testing.assert_array_equal(self.outputs(loaded, x), self.outputs(wrapped, x))

    def test_config_round_trip(self):
        _, wrapped, _ = self.wrapped()
        layers = [layer for layer in all_layers(wrapped) if isinstance(layer, (KernelWrapper, PooledQuant))]
        parts = [t for w in layers for t in getattr(w, "transforms", [])] + [w.act_quant for w in layers]
        for obj in layers + [p for p in parts if p is not None]:
            cls = type(obj)
            assert keras.saving.get_registered_name(cls) == f"{PKG}>{cls.__name__}", cls
            config = obj.get_config()
            assert cls.from_config(config).get_config() == config, cls
            assert type(keras.layers.deserialize(keras.layers.serialize(obj))) is cls

    def test_gradients_reach_the_kernel(self):
        import tensorflow as tf
        _, wrapped, x = self.wrapped()
        ws = wrappers(wrapped)
        kernels = [kernel_variable(w.layer) for w in ws]
        state = [v for w in ws for t in w.transforms for v in t.trainable_weights]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(wrapped(x, training=True)))
        grads = tape.gradient(loss, kernels + state)
        for v, g in zip(kernels + state, grads):
            assert g is not None, f"no gradient reaches {v.path}"
            g = np.asarray(g)
            assert np.all(np.isfinite(g)) and np.any(g != 0), f"gradient of {v.path} is {g}"

    def test_strip_gives_a_plain_model_with_the_same_outputs(self):
        plain, wrapped, x = self.wrapped()
        stripped = strip_model(wrapped)
        assert [(layer.name, type(layer)) for layer in all_layers(stripped)] == \
               [(layer.name, type(layer)) for layer in all_layers(plain)]
        assert not any(isinstance(layer, (KernelTransform, ActivationQuant)) for layer in all_layers(stripped))
        for w in wrappers(wrapped):
            np.testing.assert_array_equal(kernel_variable(stripped.get_layer(w.name)).numpy(), w.effective_kernel())
        with float_activations(wrapped):
            want = self.outputs(wrapped, x)
        np.testing.assert_allclose(self.outputs(stripped, x), want, rtol=1e-6, atol=1e-6)
