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
    a refitted kernel. The input model is not touched. A nested model the analysis inlined
    (`graph.inlined`) is rebuilt in place, its own layers pruned: the user's structure stays.
    """
    import keras
    overrides = overrides or {}
    masks = {n: (graph.in_mask(n, keep), graph.out_mask(n, keep)) for n in graph.order}

    def clone_layer(layer):
        if _inlined(graph, layer):
            new = keras.models.clone_model(layer, clone_function=clone_layer)
            if not layer.trainable:  # a frozen backbone stays frozen (clone_model drops the flag)
                new.trainable = False
            return new
        cfg = layer.get_config()
        spec = graph.specs.get(layer.name)
        return copy_layer(layer, cfg if spec is None else spec.configure(cfg, *masks[layer.name]))

    new = keras.models.clone_model(model, clone_function=clone_layer)
    _copy_all(graph, model, new, masks, overrides)
    return new


def copy_layer(layer, cfg: dict | None = None):
    """A new layer like `layer` built from `cfg` (default: its own config), no weights set."""
    import keras
    cfg = layer.get_config() if cfg is None else cfg
    try:
        if isinstance(layer, keras.layers.Lambda):  # its function is already loaded here:
            return layer.__class__.from_config(cfg, safe_mode=False)  # nothing new is trusted
        return layer.__class__.from_config(cfg)
    except Exception as e:
        raise PocketFlowError(
            f"cannot copy layer '{layer.name}' ({type(layer).__name__}: {str(e).splitlines()[0][:120]}); "
            "custom layers need a get_config() that returns their constructor arguments") from None


def _inlined(graph, layer) -> bool:
    import keras
    return isinstance(layer, keras.Model) and layer.name in graph.inlined


def _copy_all(graph, old_model, new_model, masks, overrides: dict) -> None:
    for layer in new_model.layers:
        if not layer.weights:  # also skips InputLayers, which clone_model may rename
            continue
        old = old_model.get_layer(layer.name)
        if _inlined(graph, old):
            _copy_all(graph, old, layer, masks, overrides)
        else:
            _copy_weights(graph, old, layer, masks, overrides.get(layer.name, {}))


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
        if side == "in" and kin == nin:  # inputs all kept: a grouped conv's axis is C_in / groups
            continue
        new[axis] = {"in": kin, "out": kout}.get(side, kin * (shape[axis] // max(1, nin)))
    return new
