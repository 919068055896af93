"""BatchNorm statistics re-estimated for a compressed model.

Pruning, masking or a short fine-tune change what every BatchNorm layer sees, while its moving
mean and variance still describe the original network: after a trial's 60-step fine-tune a pruned
VGG-small scored 0.72 on validation, 0.92 once its statistics were re-estimated on 512 training
images (docs/benchmarks/fidelity.md). The search ranks trials by that score and the final model
ships with the statistics, so both are re-estimated (`fine_tune.recalibrate_bn`, default on) and
kept only where validation accuracy does not drop (a long fine-tune's moving averages over many
batches can be better than 512 images' worth).
"""
from __future__ import annotations

import numpy as np

BN_IMAGES = 512      # training images the statistics are re-estimated on
BN_BATCH = 128
CHECK_IMAGES = 2000  # validation images the kept-or-not decision is made on


def batchnorms(model) -> list:
    """The BatchNormalization layers of `model` (nested models included) that update in training
    mode (a frozen BN keeps its statistics in Keras 3, as the user asked)."""
    import keras

    from pocketflow.learners.wrap import all_layers
    return [layer for layer in all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable and not layer.renorm]


def _dropouts(model) -> list:
    from pocketflow.learners.wrap import all_layers
    return [layer for layer in all_layers(model) if type(layer).__name__.endswith("Dropout") and hasattr(layer, "rate")]


def reestimate_bn(model, x: np.ndarray, batch: int = BN_BATCH) -> int:
    """Set every BN layer's moving mean and variance to the mean of the batch statistics it sees
    over `x` in training mode (momentum (i-1)/i at batch i: a running mean, not an EMA); returns
    the number of BN layers. Only the BN statistics change: dropout is off during the passes and
    every other variable is put back afterwards (a custom layer may update state in training)."""
    bns = batchnorms(model)
    if not bns or not len(x):
        return 0
    import keras
    stats = {id(v) for b in bns for v in (b.moving_mean, b.moving_variance)}
    kept = [(v, v.numpy()) for v in model.variables if id(v) not in stats]
    drops = [(d, d.rate) for d in _dropouts(model)]
    momenta = [b.momentum for b in bns]
    try:
        for d, _ in drops:
            d.rate = 0.0
        for i, start in enumerate(range(0, len(x), batch)):
            for b in bns:
                b.momentum = i / (i + 1)
            model(keras.ops.convert_to_tensor(x[start:start + batch]), training=True)
    finally:
        for b, m in zip(bns, momenta):
            b.momentum = m
        for d, rate in drops:
            d.rate = rate
        for v, value in kept:
            v.assign(value)
    return len(bns)


def own_copy(deploy, original):
    """`deploy`, or a copy of it when it shares variables with `original` (re-estimating must not
    touch the model every trial starts from)."""
    ids = {id(v) for v in original.variables}
    if not any(id(v) in ids for v in deploy.variables):
        return deploy
    import keras
    copy = keras.models.clone_model(deploy)
    copy.set_weights(deploy.get_weights())
    return copy


def recalibrate(model, data) -> dict | None:
    """Re-estimate `model`'s BN statistics in place, kept if validation accuracy does not drop;
    returns what was seen (None for a model without BN or data without a validation split)."""
    from pocketflow import metrics as M
    if not batchnorms(model) or not len(data.x_val):
        return None
    xv, yv = data.x_val[:CHECK_IMAGES], data.y_val[:CHECK_IMAGES]
    before = M.accuracy(model, xv, yv)
    saved = [(v, v.numpy()) for b in batchnorms(model) for v in (b.moving_mean, b.moving_variance)]
    reestimate_bn(model, data.representative(BN_IMAGES))
    after = M.accuracy(model, xv, yv)
    if after < before:
        for v, value in saved:
            v.assign(value)
    return {"val_acc_before": float(before), "val_acc_after": float(after), "kept": bool(after >= before)}
