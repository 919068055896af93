"""BatchNorm statistics re-estimated after a fine-tune (pocketflow.batchnorm): kept only where
validation accuracy does not drop, off with `learner.fine_tune.recalibrate_bn: false`."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import learner_cfg

from pocketflow.batchnorm import batchnorms, recalibrate, reestimate_bn  # noqa: E402
from pocketflow.learners import LEARNERS, Budget  # noqa: E402


@pytest.fixture(scope="module")
def bn_cnn(small_data):
    """A small VGG (conv -> BatchNorm -> ReLU blocks) trained briefly on the sample."""
    import keras

    from pocketflow.training import Trainer
    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(0)
    model = build_model("vgg_small", small_data.input_shape, small_data.num_classes,
                        {"widths": [8, 8, 16, 16, 16, 16], "dense": 32})
    Trainer(model, small_data, {"epochs": 2, "batch_size": 64, "optimizer": "adam", "learning_rate": 2e-3,
                                "schedule": "constant", "verbose": False}).fit()
    reestimate_bn(model, small_data.x_train[:1024])  # 90 steps leave BN's moving averages far behind
    return model


def _stats(model):
    return [v.numpy().copy() for b in batchnorms(model) for v in (b.moving_mean, b.moving_variance)]


def _wrong_stats(model):
    for b in batchnorms(model):
        b.moving_mean.assign(b.moving_mean.numpy() + 3.0)
        b.moving_variance.assign(b.moving_variance.numpy() * 50.0)


def test_wrong_statistics_are_re_estimated_and_kept(bn_cnn, small_data):
    import keras
    model = keras.models.clone_model(bn_cnn)
    model.set_weights(bn_cnn.get_weights())
    _wrong_stats(model)
    rec = recalibrate(model, small_data)
    assert rec["kept"] and rec["val_acc_after"] > rec["val_acc_before"] + 0.1
    again = keras.models.clone_model(model)
    again.set_weights(model.get_weights())
    reestimate_bn(again, small_data.representative(512))  # the same images: the same statistics
    for a, b in zip(_stats(model), _stats(again)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_statistics_that_lower_validation_accuracy_are_put_back_exactly(bn_cnn, small_data):
    """Re-estimated on images unlike the validation split (inverted): accuracy drops, so the
    statistics the fine-tune left are restored bit for bit."""
    import keras
    model = keras.models.clone_model(bn_cnn)
    model.set_weights(bn_cnn.get_weights())
    before = _stats(model)
    data = SimpleNamespace(x_val=small_data.x_val, y_val=small_data.y_val,
                           representative=lambda n: (1.0 - small_data.x_train[:n]) * 4.0)
    rec = recalibrate(model, data)
    assert rec["val_acc_after"] < rec["val_acc_before"] and not rec["kept"]
    for a, b in zip(before, _stats(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("on", [True, False])
def test_a_learners_fine_tune_recalibrates_unless_told_not_to(bn_cnn, small_data, on):
    """channel_pruning at keep ratio 0.5 with 3 fine-tune steps: the pruned model's BN statistics
    are re-estimated (or the guard kept the fine-tune's) with the key on, untouched with it off."""
    ft = {"verbose": False, "epochs": 1, "batch_size": 64, "recalibrate_bn": on}
    results = {}
    for flag in (on, False):
        cfg = learner_cfg("channel_pruning", preserve_ratio=0.5, fine_tune={**ft, "recalibrate_bn": flag})
        learner = LEARNERS.get("channel_pruning")(cfg, seed=0)
        results[flag] = learner.compress(bn_cnn, learner.default_params(bn_cnn),
                                         small_data, Budget(steps=3)).deploy
    plain = results[False]
    if not on:
        return  # one run: nothing to compare it with (the True case compares with it)
    import keras
    redone = keras.models.clone_model(plain)
    redone.set_weights(plain.get_weights())
    reestimate_bn(redone, small_data.representative(512))
    got, fine_tuned, reestimated = _stats(results[True]), _stats(plain), _stats(redone)
    assert got and not all(np.array_equal(a, b) for a, b in zip(fine_tuned, reestimated))
    same_as = [all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, ref))
               for ref in (fine_tuned, reestimated)]
    assert any(same_as)
    assert [w.shape for w in results[True].get_weights()] == [w.shape for w in plain.get_weights()]
