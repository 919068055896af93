"""Surgery: a narrower copy of a model, keeping chosen channels of each group.

Every layer is rebuilt from its config, rewritten by its kind's `LayerSpec.configure` (the
output width of a producer, the target shape of a Reshape), and its weights are sliced along
the axes its spec names (`LayerSpec.rules`); everything else is copied as it is.
"""
from __future__ import annotations

import numpy as np

from pocketflow.errors import PocketFlowError


def prune(graph, model, keep: dict[int, np.ndarray], overrides: dict | None = None):
    """A new, narrower model keeping channels `keep[group]` (sorted indices) of each group of
    `graph` (a ChannelGraph of `model`).

    `overrides[layer][weight]` replaces an original weight (same shape) before slicing, e.g.
    a refitted kernel. The input model is not touched.
    """
    import keras
    overrides = overrides or {}
    masks = {n: (graph.in_mask(n, keep), graph.out_mask(n, keep)) for n in graph.order}

    def clone_layer(layer):
        cfg = layer.get_config()
        spec = graph.specs.get(layer.name)
        if spec is not None:
            cfg = spec.configure(cfg, *masks[layer.name])
        try:
            if isinstance(layer, keras.layers.Lambda):  # its function is already loaded here:
                return layer.__class__.from_config(cfg, safe_mode=False)  # nothing new is trusted
            return layer.__class__.from_config(cfg)
        except Exception as e:
            raise PocketFlowError(
                f"cannot copy layer '{layer.name}' ({type(layer).__name__}: {str(e).splitlines()[0][:120]}); "
                "custom layers need a get_config() that returns their constructor arguments") from None

    new = keras.models.clone_model(model, clone_function=clone_layer)
    for layer in new.layers:
        if layer.weights:  # also skips InputLayers, which clone_model may rename
            _copy_weights(graph, model.get_layer(layer.name), layer, masks, overrides.get(layer.name, {}))
    return new


def _copy_weights(graph, old, layer, masks, mine: dict) -> None:
    rules = graph.weight_rules.get(layer.name)
    if rules is None:
        layer.set_weights(old.get_weights())
        return
    m_in, m_out = masks[layer.name]
    values = [slice_weight(np.asarray(mine.get(w.name, w.numpy())), rules[w.name], m_in, m_out) for w in old.weights]
    try:
        layer.set_weights(values)
    except ValueError as e:  # a registered layer whose weights do not follow its declared axes
        raise PocketFlowError(f"cannot slice the weights of layer '{layer.name}' ({type(layer).__name__}: "
                              f"{str(e).splitlines()[0][:120]}); check the weights given to register_layer") from None


def slice_weight(value: np.ndarray, rules: dict, m_in, m_out) -> np.ndarray:
    """`value` with the dropped channels removed along each axis of `rules` ({axis: side})."""
    for axis, side in rules.items():
        m = m_out if side == "out" else m_in
        if side == "in*":
            m = np.repeat(m_in, value.shape[axis] // len(m_in))
        if m is not None and not m.all():
            value = np.compress(m, value, axis=axis)
    return value


def sliced_shape(shape: tuple, rules: dict, kin: int, nin: int, kout: int) -> list:
    """The shape of a weight after `slice_weight` keeps `kin` of `nin` inputs and `kout` outputs."""
    new = list(shape)
    for axis, side in rules.items():
        new[axis] = {"in": kin, "out": kout}.get(side, kin * (shape[axis] // max(1, nin)))
    return new
