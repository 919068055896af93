"""Activation fake quant after a max pooling (`PooledQuant`): the same values as quantizing the
ReLU kernel layer's output, one quant per output through chains, stripped away for export."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from pocketflow.learners.transforms import ActivationQuant, FakeQuant, PooledQuant  # noqa: E402
from pocketflow.learners.wrap import (activation_quants, calibrate_activations, strip_model,  # noqa: E402
                                      wrap_model, wrappers)

ALL = lambda name: True  # noqa: E731


def qat(model, x):
    m = wrap_model(model, ALL, lambda n, layer, e: [FakeQuant(8)], lambda n: 8)
    calibrate_activations(m, x)
    return m


def test_quant_moves_after_the_pool_with_identical_values(trained_seed_cnn, small_data):
    x = small_data.x_train[:256]
    m = qat(trained_seed_cnn, x)
    conv, pool = m.get_layer("conv"), m.get_layer("pool")
    assert conv.act_quant is None and isinstance(pool, PooledQuant)
    assert len(activation_quants(m)) == 2  # conv's (after the pool) and the logits'
    q = pool.act_quant
    conv_out = keras.Model(m.input, conv.output)(x, training=False).numpy()
    # calibration saw the same maximum as it would have before the pool (26x26 pools evenly)
    assert float(q.lo.numpy()) == 0.0 and float(q.hi.numpy()) == pytest.approx(float(conv_out.max()), rel=1e-6)
    # quantize-then-pool (what int8 TFLite computes) == pool-then-quantize, bit for bit
    fq = tf.quantization.fake_quant_with_min_max_vars(conv_out, q.lo.numpy(), q.hi.numpy(), num_bits=8)
    want = tf.nn.max_pool2d(fq, 2, 2, "VALID").numpy()
    got = keras.Model(m.input, pool.output)(x, training=False).numpy()
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) <= 256


def test_one_quant_per_output_through_rewrapping_saving_and_stripping(trained_seed_cnn, small_data, tmp_path):
    x = small_data.x_train[:64]
    m = qat(trained_seed_cnn, small_data.x_train[:256])
    again = wrap_model(m, ALL, lambda n, layer, e: [], lambda n: 8)  # a chain adding another QAT step
    assert again.get_layer("conv").act_quant is None and isinstance(again.get_layer("pool"), PooledQuant)
    assert len(activation_quants(again)) == 2
    np.testing.assert_array_equal(again(x, training=False).numpy(), m(x, training=False).numpy())
    m.save(tmp_path / "qat.keras")
    loaded = keras.saving.load_model(tmp_path / "qat.keras")
    np.testing.assert_array_equal(loaded(x, training=False).numpy(), m(x, training=False).numpy())
    plain = strip_model(m)
    assert type(plain.get_layer("pool")) is keras.layers.MaxPooling2D
    assert not any(isinstance(layer, (PooledQuant, ActivationQuant)) for layer in plain.layers)


def test_no_move_without_relu_or_with_a_gapped_pool():
    inp = keras.Input((12, 12, 3))
    a = keras.layers.Conv2D(4, 3, name="linear_conv")(inp)             # may be negative: min differs
    a = keras.layers.MaxPooling2D(2, name="pool_a")(a)
    b = keras.layers.Conv2D(4, 3, activation="relu", name="relu_conv")(inp)
    b = keras.layers.MaxPooling2D(2, strides=3, name="pool_b")(b)      # skips inputs: max may differ
    out = keras.layers.Concatenate()([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    m = wrap_model(keras.Model(inp, out), ALL, lambda n, layer, e: [FakeQuant(8)], lambda n: 8)
    assert not any(isinstance(layer, PooledQuant) for layer in m.layers)
    assert all(isinstance(w.act_quant, ActivationQuant) for w in wrappers(m))
