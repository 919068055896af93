"""Every built-in kernel transform against the `TransformTestCase` contract (forward pass,
`.keras` round trip, configs, gradients, stripping), each with its own numerical guarantee."""
from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from pocketflow.learners.kernels import as_matrix, is_depthwise  # noqa: E402
from pocketflow.learners.transforms import (Codebook, FakeQuant, MagnitudeMask, PooledQuant,  # noqa: E402
                                            expected_zeros)
from pocketflow.learners.wrap import wrappers  # noqa: E402
from pocketflow.testing import TransformTestCase  # noqa: E402


class TestMagnitudeMask(TransformTestCase):
    sparsity = 0.6

    def make_transforms(self, name, layer, existing):
        return [MagnitudeMask("unstructured", depthwise=is_depthwise(layer))]

    def prepare(self, wrapped, x):
        for w in wrappers(wrapped):
            w.transforms[0].set_sparsity(w.kernel_input(0), self.sparsity)

    def check_kernel(self, name, kernel, effective):
        zero = effective == 0
        assert zero.sum() == expected_zeros(kernel.shape, self.sparsity, "unstructured", False), name
        np.testing.assert_array_equal(effective[~zero], kernel[~zero])
        assert np.abs(kernel[zero]).max() <= np.abs(kernel[~zero]).min()  # the smallest went


class TestFakeQuant(TransformTestCase):
    bits = 4

    def make_transforms(self, name, layer, existing):
        return [FakeQuant(self.bits, depthwise=is_depthwise(layer))]

    def check_kernel(self, name, kernel, effective):
        depthwise = name == "dw"
        scales = FakeQuant(self.bits, depthwise=depthwise).scales(kernel)
        q = as_matrix(effective, depthwise) / scales[:, None]  # rows = channels
        np.testing.assert_allclose(q, np.round(q), atol=1e-4)
        assert np.abs(np.round(q)).max() == 2 ** (self.bits - 1) - 1  # the channel maximum is on the grid
        assert np.all(np.abs(as_matrix(effective - kernel, depthwise)) <= scales[:, None] / 2 + 1e-7)  # rounded


class TestCodebook(TransformTestCase):
    bits = 3

    def make_transforms(self, name, layer, existing):
        return [Codebook(self.bits, depthwise=is_depthwise(layer))]

    def check_kernel(self, name, kernel, effective):
        values = np.unique(effective)
        assert 1 < len(values) <= 2 ** self.bits, name
        # every weight sits on its nearest shared value
        dist = np.abs(kernel.ravel()[:, None] - values[None, :])
        np.testing.assert_allclose(np.abs(kernel - effective).ravel(), dist.min(axis=1), atol=1e-6)


class TestActivationQuant(TransformTestCase):
    """Activation fake quant only (kernels untouched): after the ReLU conv it moves past the max
    pooling (`PooledQuant`), the logits get their own."""
    output_bits = 8

    def make_transforms(self, name, layer, existing):
        return []

    def check_kernel(self, name, kernel, effective):
        np.testing.assert_array_equal(effective, kernel)

    def check_model(self, wrapped, x):
        pool = wrapped.get_layer("pool")
        assert isinstance(pool, PooledQuant) and getattr(wrapped.get_layer("conv"), "act_quant", None) is None
        assert wrapped.get_layer("fc").act_quant is not None
        feats = keras.Model(wrapped.input, pool.output)(x, training=False).numpy()
        assert feats.min() == 0 and 16 < len(np.unique(feats)) <= 2 ** self.output_bits
        assert len(np.unique(self.outputs(wrapped, x))) <= 2 ** self.output_bits


class TestChainedTransforms(TransformTestCase):
    """mask -> codebook -> per-tensor fake quant, with activation quant: composing keeps zeros
    and at most 2^bits values."""
    output_bits = 8

    def make_transforms(self, name, layer, existing):
        d = is_depthwise(layer)
        return [MagnitudeMask(depthwise=d), Codebook(4, depthwise=d), FakeQuant(8, per_channel=False, depthwise=d)]

    def prepare(self, wrapped, x):
        for w in wrappers(wrapped):
            w.transforms[0].set_sparsity(w.kernel_input(0), 0.5)
            for i in (1, 2):
                w.transforms[i].initialize(w.kernel_input(i))
        super().prepare(wrapped, x)

    def check_kernel(self, name, kernel, effective):
        assert (effective == 0).sum() >= expected_zeros(kernel.shape, 0.5, "unstructured", False)
        assert len(np.unique(effective)) <= 16
