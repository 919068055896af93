"""Nested models: a backbone used as one layer of the user's model (transfer learning:
`base = keras.applications.X(include_top=False); y = base(inp)`), followed into.

`inline` rebuilds the model as one functional graph of copies of its layers (same names, same
weights), so the channel groups, the cost model, the criteria and the latency table see the
backbone's layers like any other: they read tensors of one graph (`layer.input` / `.output`),
which a nested model's layers, called in another graph, do not offer. The surgery keeps the
user's structure: a model in `inlined` is rebuilt as a nested model again, its own layers
pruned (`surgery.prune`), since a user who froze the backbone or saves it apart expects it there.

Inlining must be exact, so only a plain Functional or built Sequential is inlined, called once,
with no call argument but `training` (passed on to its layers, as Keras does), built for inputs
of a known size (else metrics counts its layers at 0 MACs while the inlined copies count real
ones: predicted and measured FLOPs would disagree), and only if none of its layer names is used
elsewhere in the model (the analysis is keyed by layer name). Any other nested model stays one
opaque layer and the reason is reported.
"""
from __future__ import annotations

from collections import Counter

from pocketflow.learners.channel_pruning.surgery import copy_layer


def _is_model(layer) -> bool:
    import keras
    return isinstance(layer, keras.Model)


def _functional(model):
    """The graph of a Functional or built Sequential model, or None."""
    import keras
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    return model if hasattr(model, "_nodes_by_depth") else None


def _nodes(model) -> list:
    return [n for ns in _functional(model)._nodes_by_depth.values() for n in ns]


def _names(model, inner: bool = False) -> Counter:
    """Layer names at every depth (a nested model's own input layers vanish when inlined)."""
    out = Counter()
    for layer in model.layers:
        if inner and type(layer).__name__ == "InputLayer":
            continue
        out[layer.name] += 1
        if _is_model(layer) and _functional(layer) is not None:
            out.update(_names(layer, inner=True))
    return out


def _why_not(layer, nodes: list, names: Counter) -> str | None:
    """Why the nested model `layer` (called at `nodes`) cannot be inlined, or None."""
    kind = type(layer).__name__
    if kind not in ("Functional", "Sequential") or not type(layer).__module__.startswith("keras"):
        return f"nested model of class {kind} (a subclassed model has no layer graph to follow)"
    if _functional(layer) is None:
        return "nested Sequential model that is not built"
    if len(nodes) != 1:
        return f"nested model called {len(nodes)} times (its layers are shared)"
    unknown = [t.shape for t in _functional(layer).inputs if None in tuple(t.shape)[1:]]
    if unknown:  # its layers' MACs would be counted 0 in the user's model (pocketflow.metrics)
        return (f"nested model built for inputs of unknown size {tuple(unknown[0])} (give it an "
                "input_shape to prune through it)")
    extra = sorted(k for k, v in nodes[0].arguments.kwargs.items() if k != "training" and v is not None)
    if extra:
        return f"nested model called with {', '.join(extra)}"
    clash = [n for n in _names(layer, inner=True) if names[n] > 1]
    if clash:
        return f"nested model whose layer name '{clash[0]}' is used more than once in the model"
    return None


def _plan(model, names: Counter, inlined: set, why: dict) -> None:
    """Decide for every nested model, at every depth, whether it is inlined."""
    calls: dict[str, list] = {}
    for n in _nodes(model):
        calls.setdefault(n.operation.name, []).append(n)
    for layer in model.layers:
        if not _is_model(layer):
            continue
        reason = _why_not(layer, calls.get(layer.name, []), names)
        if reason:
            why[layer.name] = reason
        else:
            inlined.add(layer.name)
            _plan(layer, names, inlined, why)


def _run(model, inputs: list, inlined: set, clones: dict, context: dict):
    """`model`'s graph called on `inputs`, with copies of its layers and inlined nested models."""
    import keras

    def operation(layer):
        if layer.name in inlined and _is_model(layer):
            return layer
        if id(layer) not in clones:  # a shared layer stays shared
            clones[id(layer)] = (copy_layer(layer), layer)
        return clones[id(layer)][0]

    def call(op, *args, **kwargs):
        for k, v in context.items():  # what Functional.call does with a caller's training flag
            if v is not None and k in getattr(op, "_call_context_args", ()):
                kwargs[k] = v
        if _is_model(op) and op.name in inlined:
            ins = keras.tree.flatten(args[0] if args else kwargs["inputs"])
            return _run(op, ins, inlined, clones, {"training": kwargs.get("training")})
        return op(*args, **kwargs)

    return keras.tree.flatten(_functional(model)._run_through_graph(inputs, operation_fn=operation, call_fn=call))


def inline(model) -> tuple[object, set, dict]:
    """(`model` as one functional graph, names of the nested models inlined, nested model name ->
    why it was not). `model` itself when it has nothing to inline; it is never modified."""
    import keras
    inlined, why = set(), {}
    if _functional(model) is not None and any(_is_model(layer) for layer in model.layers):
        _plan(model, _names(model), inlined, why)
    if not inlined:
        return model, inlined, why
    ins = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name) for t in _functional(model).inputs]
    clones: dict = {}
    outs = _run(model, ins, inlined, clones, {})
    flat = keras.Model(ins[0] if len(ins) == 1 else ins, outs[0] if len(outs) == 1 else outs, name=model.name)
    for new, old in clones.values():
        if old.weights:
            new.set_weights(old.get_weights())
    return flat, inlined, why
