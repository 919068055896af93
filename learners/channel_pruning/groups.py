"""Channel groups of a Keras model: which channels must be pruned together.

Removing output filter c of a conv is only valid if every layer that reads channel c loses it
too: its BatchNormalization, a depthwise conv after it (whose output channel c goes as well),
the other branch of a residual Add, the rows of a Dense behind a Flatten. `analyse` walks the
functional graph once (`topology.walk`) and tracks, for every tensor, which group and which
channel of that group each position of its last axis holds (its *layout*). How a layer moves
the layout is its kind in the layer registry (`topology.register_layer`): producers start new
groups, per-channel and pass-through layers keep the layout, merges unite the groups position
by position, Concatenate and Flatten rearrange it. Anything else is opaque: the groups it
touches are pinned and a one-line reason is recorded for it, and so is a layer whose analysis
fails for any reason. Groups reaching a model output are pinned too (the logits are never pruned).
A nested model is analysed through its layers (`nested.inline`): the graph is of the inlined model.
A grouped conv, opaque to the registry, is followed here (`_grouped`): its outputs prune, its inputs stay.
"""
from __future__ import annotations

import math

import numpy as np

from pocketflow.learners.channel_pruning.graph import ChannelGraph, Group, Layout
from pocketflow.learners.channel_pruning.nested import inline
from pocketflow.learners.topology import (CHANNELWISE, CONCAT, FLATTEN, INPUT, MERGE, OPAQUE, PASS, PRODUCER,
                                          SEPARABLE, _ungrouped, classify, mixing_activation, spec_of, walk)


class _Groups:
    """Union-find over provisional groups; a union is pinned if any part is."""

    def __init__(self):
        self.parent, self.size, self.pinned, self.producers = [], [], [], []

    def new(self, size: int, producer: str | None = None, pinned: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.pinned.append(pinned)
        self.producers.append([producer] if producer else [])
        return len(self.parent) - 1

    def fresh(self, n: int, producer: str | None = None, pinned: str | None = None) -> Layout:
        g = self.new(n, producer, pinned)
        return Layout(np.full(n, g, np.int64), np.arange(n, dtype=np.int64))

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        if b < a:
            a, b = b, a
        self.parent[b] = a
        self.pinned[a] = self.pinned[a] or self.pinned[b]
        self.producers[a] += self.producers[b]
        if self.size[a] != self.size[b]:  # cannot happen when layouts match position by position
            self.pinned[a] = self.pinned[a] or "residual branches of different widths"
        return a

    def pin(self, g: int, why: str) -> None:
        r = self.find(g)
        self.pinned[r] = self.pinned[r] or why


def _shape(t) -> tuple:
    return tuple(t.shape)


def _width(t) -> int:
    s = _shape(t)
    return int(s[-1]) if s and s[-1] is not None else 0


# -- how each kind moves the layout: (groups, node, input layouts) -> (output layout, or None and why)

def _input(groups, node, in_lay):
    return groups.fresh(_width(node.outputs[0]), pinned="model input"), None


def _produce(groups, node, in_lay):
    out = groups.fresh(_width(node.outputs[0]), producer=node.layer.name)
    act = mixing_activation(node.layer)
    if act:
        groups.pin(int(out.group[0]), f"{act} output")
    return out, None


def _grouped(groups, node, in_lay):
    """A grouped conv (groups=G): output block b reads input block b only, and Keras needs every
    block equally wide. So its input channels are kept, and its output channels form one group
    of C_out/G channels, channel j at position j of every block: pruning j narrows all blocks alike."""
    layer, n = node.layer, _width(node.outputs[0])
    for g in np.unique(in_lay[0].group):
        groups.pin(int(g), f"read by grouped convolution {layer.name} (its blocks must stay equally wide)")
    k, act = n // layer.groups, mixing_activation(layer)
    gid = groups.new(k, producer=layer.name, pinned=f"{act} output" if act else None)
    return Layout(np.full(n, gid, np.int64), np.tile(np.arange(k, dtype=np.int64), layer.groups)), None


def _same(groups, node, in_lay):
    return in_lay[0], None


def _merge(groups, node, in_lay):
    """Element-wise merge: unite the inputs' groups position by position (broadcast width-1 inputs)."""
    wide = [lay for lay in in_lay if len(lay) != 1]
    widths = {len(lay) for lay in wide}
    if len(widths) > 1:
        return None, f"inputs of different channel counts {sorted(widths)}"
    for lay in in_lay:
        if len(lay) == 1 and wide:  # broadcast: its single channel must stay
            groups.pin(int(lay.group[0]), "broadcast into a wider tensor")
    base = (wide or in_lay)[0]
    for other in (wide or in_lay)[1:]:
        if not np.array_equal(base.index, other.index):
            return None, "inputs hold their channels in different orders"
        for a, b in set(zip(base.group.tolist(), other.group.tolist())):
            groups.union(a, b)
    return base, None


def _concat(groups, node, in_lay):
    return Layout(np.concatenate([lay.group for lay in in_lay]), np.concatenate([lay.index for lay in in_lay])), None


def _flatten(groups, node, in_lay):
    shp = _shape(node.inputs[0])
    reps = math.prod(shp[1:-1]) if len(shp) > 2 else 1
    if reps and None not in shp[1:]:
        return Layout(np.tile(in_lay[0].group, reps), np.tile(in_lay[0].index, reps)), None
    return None, "Flatten of an input with unknown spatial size"


_FLOW = {INPUT: _input, PRODUCER: _produce, SEPARABLE: _produce, CHANNELWISE: _same, PASS: _same,
         MERGE: _merge, CONCAT: _concat, FLATTEN: _flatten}
_SHAREABLE = (INPUT, PASS, MERGE, CONCAT, FLATTEN)  # kinds a layer called more than once may have


class _Analysis:
    """The state of one walk: layouts of the tensors seen so far and what is known per layer."""

    def __init__(self, topo, nested_why: dict):
        self.topo, self.groups, self.nested_why = topo, _Groups(), nested_why
        self.layout: dict[int, Layout] = {}   # id(KerasTensor) -> Layout
        self.kinds: dict[str, str] = {}
        self.specs: dict = {}
        self.reasons: list[str] = []
        self.lay_in: dict[str, Layout] = {}
        self.lay_out: dict[str, Layout] = {}
        self.order: list[str] = []

    def _flow(self, node, in_lay) -> tuple[str, Layout | None, str | None]:
        layer, ins, outs = node.layer, node.inputs, node.outputs
        kind, why = classify(layer, [_shape(t) for t in ins], [_shape(t) for t in outs])
        flow = _FLOW.get(kind)
        if kind == OPAQUE and getattr(layer, "groups", 1) > 1 and why == _ungrouped(layer, ins, outs) and in_lay:
            kind, why, flow = PRODUCER, None, _grouped  # classify's only objection is the groups
        calls = self.topo.calls[layer.name]
        if calls > 1 and kind not in _SHAREABLE:
            kind, why = OPAQUE, f"shared layer (called {calls} times)"
        out = None
        if kind != OPAQUE:
            out, why = flow(self.groups, node, in_lay)
            kind = OPAQUE if out is None else kind
        if len(in_lay) != len(ins) and kind != INPUT:
            kind, why = OPAQUE, "input from outside the analysed graph"
        wrong = [_width(t) for t in outs if _width(t) and out is not None and _width(t) != len(out)]
        if kind != OPAQUE and wrong:  # e.g. a registered layer that changes the channel count
            kind, why = OPAQUE, f"its {len(out)} input channels come out as {wrong[0]}"
        return kind, out, why

    def visit(self, node) -> None:
        layer = node.layer
        in_lay = [self.layout[id(t)] for t in node.inputs if id(t) in self.layout]
        try:
            kind, out, why = self._flow(node, in_lay)
        except Exception as e:  # the analysis reports, it never stops a run
            kind, why = OPAQUE, f"analysis failed ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
        if kind == OPAQUE:
            why = self.nested_why.get(layer.name, why)
            for lay in in_lay:
                for g in np.unique(lay.group):
                    self.groups.pin(int(g), f"next to {layer.name}")
            self.reasons.append(f"{layer.name} ({type(layer).__name__}): {why}; channels next to it are kept")
            out_lays = [self.groups.fresh(_width(t), pinned=f"output of {layer.name}") for t in node.outputs]
        else:
            out_lays = [out] * len(node.outputs)
            if kind != INPUT:
                self.specs[layer.name] = spec_of(layer)
        for t, lay in zip(node.outputs, out_lays):
            self.layout[id(t)] = lay
        if layer.name not in self.kinds:  # a shared pass-through layer is listed once
            self.order.append(layer.name)
        self.kinds[layer.name] = kind
        if in_lay:
            self.lay_in[layer.name] = in_lay[0]
        self.lay_out[layer.name] = out_lays[0]


def analyse(model) -> ChannelGraph:
    """Channel groups of `model` (never raises on a layer: unknown ones are pinned with a reason).
    Their layer names are those of `model`; `graph.model` is the model they were found on (its
    nested models inlined), the one to read tensors or layers of."""
    try:
        flat, inlined, why = inline(model)
    except Exception as e:  # e.g. a layer inside that cannot be copied: the nested models stay opaque
        import keras
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        flat, inlined, why = model, set(), {layer.name: f"nested model that cannot be inlined ({msg})"
                                            for layer in model.layers if isinstance(layer, keras.Model)}
    topo = walk(flat)
    a = _Analysis(topo, why)
    for node in topo.nodes:
        a.visit(node)
    for t in topo.outputs:
        for g in np.unique(a.layout[id(t)].group):
            a.groups.pin(int(g), "reaches the model output")
    graph = _result(a, flat)
    graph.inlined = inlined
    return graph


def _result(a: _Analysis, model) -> ChannelGraph:
    """The graph with groups numbered in the order they first appear, layouts in those numbers."""
    uf, roots, groups = a.groups, {}, []
    for name in a.order:
        for g in dict.fromkeys(a.lay_out[name].group.tolist()):
            r = uf.find(g)
            if r not in roots:
                roots[r] = len(groups)
                prods = uf.producers[r]
                groups.append(Group(len(groups), prods[0] if prods else f"{name}:{len(groups)}",
                                    uf.size[r], list(prods), pinned=uf.pinned[r]))
    remap = np.array([roots.get(uf.find(g), -1) for g in range(len(uf.parent))], np.int64)
    lay_in = {k: Layout(remap[v.group], v.index) for k, v in a.lay_in.items()}
    lay_out = {k: Layout(remap[v.group], v.index) for k, v in a.lay_out.items()}
    for name in a.order:
        kind, lay = a.kinds[name], lay_in.get(name)
        for g in (dict.fromkeys(lay.group.tolist()) if lay is not None else ()):
            if kind in (PRODUCER, SEPARABLE):
                groups[g].consumers.append(name)
            elif kind == CHANNELWISE:
                groups[g].members.append(name)
    specs = {n: s for n, s in a.specs.items() if a.kinds[n] != OPAQUE}
    return ChannelGraph(groups, a.kinds, specs, lay_in, lay_out, a.order, a.reasons, model)

