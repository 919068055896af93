"""Channel groups of a Keras model: which channels must be pruned together, and the surgery.

Removing output filter c of a conv is only valid if every layer that reads channel c loses it
too: its BatchNormalization, a depthwise conv after it (whose output channel c goes as well),
the other branch of a residual Add, the rows of a Dense behind a Flatten. `analyse` walks the
functional graph once and tracks, for every tensor, which group and which channel of that group
each position of its last axis holds (its *layout*). Producers (Conv/Dense) start new groups;
per-channel layers and pass-through layers keep the layout; Add & co. unite the groups position
by position; Concatenate and Flatten rearrange it. Anything else (Lambda, custom layers, Reshape
that moves channels, ...) is opaque: the groups it touches are pinned and a one-line reason is
recorded for it. Groups reaching a model output are pinned too (the logits are never pruned).

From the layouts every layer's input and output channel masks follow, which is all the surgery
(`ChannelGraph.prune`) and the analytic cost model (`macs`, `params`) need.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from pocketflow.errors import PocketFlowError

# how a layer treats the channels of its (last) axis
INPUT = "input"            # a model input: channels are fixed
PRODUCER = "producer"      # Conv/Dense: new output channels, input channels are kernel rows
SEPARABLE = "separable"    # SeparableConv2D: a producer whose input goes through a depthwise kernel
CHANNELWISE = "channelwise"  # BatchNormalization, DepthwiseConv2D: one weight slice per channel
PASS = "pass"              # activations, pooling, dropout, padding: layout unchanged, no weights
MERGE = "merge"            # Add, Multiply, ...: inputs share one layout
CONCAT = "concat"          # Concatenate on the channel axis
FLATTEN = "flatten"        # Flatten (channels-last): the layout repeats once per spatial position
OPAQUE = "opaque"          # anything else: groups touching it are pinned

# weights that are sliced, per kind: weight name -> {axis: side}; side "in" or "out" picks the
# input or output channel mask; "in*" is the input mask repeated `depth_multiplier` times.
_SLICES = {
    PRODUCER: {"kernel": {-2: "in", -1: "out"}, "bias": {-1: "out"}},
    SEPARABLE: {"depthwise_kernel": {-2: "in"}, "pointwise_kernel": {-2: "in*", -1: "out"},
                "bias": {-1: "out"}},
    CHANNELWISE: {"*": {-1: "in"}, "kernel": {-2: "in"}},  # BN vectors; depthwise (kh, kw, C, 1)
}


@dataclass
class Group:
    """Channels that are pruned together."""
    id: int
    name: str                 # its first producer (the search-space key is `ratio/<name>`)
    size: int
    producers: list = field(default_factory=list)  # layers whose output filters/units these are
    members: list = field(default_factory=list)    # per-channel layers sliced along them (BN, depthwise)
    consumers: list = field(default_factory=list)  # layers whose input channels (kernel rows) these are
    pinned: str | None = None                      # why it cannot be pruned, or None

    @property
    def prunable(self) -> bool:
        return self.pinned is None


@dataclass
class Layout:
    """What each position of a tensor's last axis holds: a group id and a channel of that group."""
    group: np.ndarray
    index: np.ndarray

    def __len__(self):
        return len(self.group)

    @functools.cached_property
    def positions(self) -> dict:
        """group id -> how many positions hold its channels (size x repeats after a Flatten)."""
        ids, n = np.unique(self.group, return_counts=True)
        return {int(g): int(c) for g, c in zip(ids, n)}


# -- layer classification ------------------------------------------------------------------------

def _layer_types():
    import keras
    L = keras.layers
    passthrough = [L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
                   L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
                   L.ActivityRegularization, L.Identity, L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
                   L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
                   L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
                   L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
                   L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D,
                   L.Cropping3D, L.UpSampling1D, L.UpSampling2D, L.UpSampling3D, L.Activation]
    return {
        "producer": (L.Conv1D, L.Conv2D, L.Conv3D, L.Dense),
        "separable": (L.SeparableConv1D, L.SeparableConv2D),
        "channelwise": (L.BatchNormalization, L.DepthwiseConv1D, L.DepthwiseConv2D),
        "pass": tuple(passthrough),
        "merge": (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum),
    }


_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    return getattr(act, "__name__", str(act)) if act is not None else ""


def classify(layer, in_shapes: list, out_shapes: list) -> tuple[str, str | None]:
    """(kind, None) for a layer the analysis understands, else (OPAQUE, one-line reason).

    Exact type matches only: a subclass may change what `call` does with the channels.
    """
    import keras
    T = _layer_types()
    cls = type(layer)
    name = cls.__name__
    if name == "InputLayer":
        return INPUT, None
    if isinstance(layer, keras.Model):
        return OPAQUE, f"nested model ({name}) is treated as one opaque layer"
    if name == "Lambda":
        return OPAQUE, "Lambda layer (arbitrary code)"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return OPAQUE, f"{name} with data_format={layer.data_format} (only channels_last is supported)"
    if getattr(layer, "quantization_mode", None):
        return OPAQUE, f"quantized {name} ({layer.quantization_mode})"
    rank = len(in_shapes[0]) if in_shapes else 0
    if cls in T["producer"]:
        if getattr(layer, "groups", 1) != 1:
            return OPAQUE, f"grouped convolution (groups={layer.groups})"
        return PRODUCER, None
    if cls in T["separable"]:
        return SEPARABLE, None
    if cls in T["channelwise"]:
        if getattr(layer, "depth_multiplier", 1) != 1:
            return OPAQUE, f"depth_multiplier={layer.depth_multiplier} (only 1 is supported)"
        if cls is keras.layers.BatchNormalization and layer.axis not in (-1, rank - 1):
            return OPAQUE, f"BatchNormalization over axis {layer.axis} (not the channel axis)"
        return CHANNELWISE, None
    if cls in T["pass"]:
        if _activation_name(layer) in _MIXING_ACTIVATIONS:
            return OPAQUE, f"{_activation_name(layer)} mixes channels"
        return PASS, None
    if cls in T["merge"]:
        return MERGE, None
    if cls is keras.layers.Concatenate:
        return (CONCAT, None) if layer.axis in (-1, rank - 1) else (MERGE, None)
    if cls is keras.layers.Flatten:
        return FLATTEN, None
    if cls is keras.layers.Reshape:
        if in_shapes and out_shapes and in_shapes[0][-1] is not None and out_shapes[0][-1] == in_shapes[0][-1]:
            return PASS, None  # only the spatial axes move: channel c stays at position c
        if out_shapes and len(out_shapes[0]) == 2:
            return FLATTEN, None
        return OPAQUE, "Reshape moves channels between axes"
    return OPAQUE, f"{name} is not a layer channel pruning knows"


# -- the analysis ----------------------------------------------------------------------------------

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


def _fresh(groups: _Groups, n: int, producer: str | None = None, pinned: str | None = None) -> Layout:
    g = groups.new(n, producer, pinned)
    return Layout(np.full(n, g, np.int64), np.arange(n, dtype=np.int64))


def _shape(t) -> tuple:
    return tuple(t.shape)


def _graph_nodes(model):
    """The model's call nodes in topological order (functional or built Sequential)."""
    import keras
    fn = model
    if isinstance(model, keras.Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise PocketFlowError(f"Sequential model '{model.name}' is not built: give it an Input "
                                  "or call it once before compressing")
    by_depth = getattr(fn, "_nodes_by_depth", None)
    if by_depth is None:
        raise PocketFlowError(f"model '{model.name}' is a subclassed Keras model without a layer graph; "
                              "channel pruning needs a functional or Sequential model")
    nodes = [n for d in sorted(by_depth, reverse=True) for n in by_depth[d]]
    return nodes, fn


def _merge(groups: _Groups, layouts: list[Layout]) -> tuple[Layout | None, str | None]:
    """Element-wise merge: unite the inputs' groups position by position (broadcast width-1 inputs)."""
    wide = [lay for lay in layouts if len(lay) != 1]
    widths = {len(lay) for lay in wide}
    if len(widths) > 1:
        return None, f"inputs of different channel counts {sorted(widths)}"
    for lay in layouts:
        if len(lay) == 1 and wide:  # broadcast: its single channel must stay
            groups.pin(int(lay.group[0]), "broadcast into a wider tensor")
    base = (wide or layouts)[0]
    for other in (wide or layouts)[1:]:
        if not np.array_equal(base.index, other.index):
            return None, "inputs hold their channels in different orders"
        for a, b in set(zip(base.group.tolist(), other.group.tolist())):
            groups.union(a, b)
    return base, None


def analyse(model) -> "ChannelGraph":
    """Channel groups of `model` (never raises on a layer: unknown ones are pinned with a reason)."""
    nodes, fn = _graph_nodes(model)
    calls: dict[str, int] = {}
    for n in nodes:
        calls[n.operation.name] = calls.get(n.operation.name, 0) + 1
    groups = _Groups()
    layout: dict[int, Layout] = {}   # id(KerasTensor) -> Layout
    kinds: dict[str, str] = {}
    reasons: list[str] = []
    lay_in: dict[str, Layout] = {}
    lay_out: dict[str, Layout] = {}
    order: list[str] = []

    for node in nodes:
        layer = node.operation
        ins, outs = list(node.input_tensors), list(node.output_tensors)
        in_lay = [layout[id(t)] for t in ins if id(t) in layout]
        try:
            kind, why = classify(layer, [_shape(t) for t in ins], [_shape(t) for t in outs])
            if calls[layer.name] > 1 and kind not in (INPUT, PASS, MERGE, CONCAT, FLATTEN):
                kind, why = OPAQUE, f"shared layer (called {calls[layer.name]} times)"
            out = None
            if kind == INPUT:
                out = _fresh(groups, _width(outs[0]), pinned="model input")
            elif kind in (PRODUCER, SEPARABLE):
                out = _fresh(groups, _width(outs[0]), producer=layer.name)
                if _activation_name(layer) in _MIXING_ACTIVATIONS:
                    groups.pin(int(out.group[0]), f"{_activation_name(layer)} output")
            elif kind in (CHANNELWISE, PASS):
                out = in_lay[0]
            elif kind == MERGE:
                out, why = _merge(groups, in_lay)
                kind = OPAQUE if out is None else kind
            elif kind == CONCAT:
                out = Layout(np.concatenate([lay.group for lay in in_lay]),
                             np.concatenate([lay.index for lay in in_lay]))
            elif kind == FLATTEN:
                shp = _shape(ins[0])
                reps = math.prod(shp[1:-1]) if len(shp) > 2 else 1
                if reps and None not in shp[1:]:
                    out = Layout(np.tile(in_lay[0].group, reps), np.tile(in_lay[0].index, reps))
                else:
                    kind, why = OPAQUE, "Flatten of an input with unknown spatial size"
            if len(in_lay) != len(ins) and kind != INPUT:
                kind, why = OPAQUE, "input from outside the analysed graph"
        except Exception as e:  # the analysis reports, it never stops a run
            kind, why = OPAQUE, f"analysis failed ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        if kind == OPAQUE:
            for lay in in_lay:
                for g in np.unique(lay.group):
                    groups.pin(int(g), f"next to {layer.name}")
            reasons.append(f"{layer.name} ({type(layer).__name__}): {why}; channels next to it are kept")
            out_lays = [_fresh(groups, _width(t), pinned=f"output of {layer.name}") for t in outs]
        else:
            out_lays = [out] * len(outs)
        for t, lay in zip(outs, out_lays):
            layout[id(t)] = lay
        if layer.name not in kinds:  # a shared pass-through layer is listed once
            order.append(layer.name)
        kinds[layer.name] = kind
        if in_lay:
            lay_in[layer.name] = in_lay[0]
        lay_out[layer.name] = out_lays[0]

    for t in fn.outputs:
        for g in np.unique(layout[id(t)].group):
            groups.pin(int(g), "reaches the model output")
    return ChannelGraph._build(groups, kinds, lay_in, lay_out, order, reasons, model)


def _width(t) -> int:
    s = _shape(t)
    return int(s[-1]) if s and s[-1] is not None else 0


# -- the result --------------------------------------------------------------------------------------

class ChannelGraph:
    """Groups, per-layer layouts (with root group ids) and what follows from them."""

    def __init__(self, groups, kinds, lay_in, lay_out, order, reasons, base_macs, base_params, shapes,
                 orig_macs):
        self.groups: list[Group] = groups
        self.kinds: dict[str, str] = kinds
        self.lay_in: dict[str, Layout] = lay_in
        self.lay_out: dict[str, Layout] = lay_out
        self.order: list[str] = order
        self.reasons: list[str] = reasons
        self.base_macs, self.base_params = base_macs, base_params
        self._shapes = shapes          # layer -> [(weight name, shape)]
        self._orig_macs = orig_macs    # layer -> MACs of the unpruned layer

    @classmethod
    def _build(cls, uf: _Groups, kinds, lay_in, lay_out, order, reasons, model):
        from pocketflow import metrics as M
        roots, groups = {}, []
        for name in order:  # number groups in the order they first appear
            for g in dict.fromkeys(lay_out[name].group.tolist()):
                r = uf.find(g)
                if r not in roots:
                    roots[r] = len(groups)
                    prods = uf.producers[r]
                    groups.append(Group(len(groups), prods[0] if prods else f"{name}:{len(groups)}",
                                        uf.size[r], list(prods), pinned=uf.pinned[r]))
        remap = np.zeros(len(uf.parent), np.int64)
        for g in range(len(uf.parent)):
            remap[g] = roots.get(uf.find(g), -1)

        def rooted(lay):
            return Layout(remap[lay.group], lay.index)
        lay_in = {k: rooted(v) for k, v in lay_in.items()}
        lay_out = {k: rooted(v) for k, v in lay_out.items()}
        for name in order:
            kind, lay = kinds[name], lay_in.get(name)
            if lay is None:
                continue
            for g in dict.fromkeys(lay.group.tolist()):
                if kind in (PRODUCER, SEPARABLE):
                    groups[g].consumers.append(name)
                elif kind == CHANNELWISE:
                    groups[g].members.append(name)
        rows = M.layer_costs(model)
        costs = {r.name: r.macs for r in rows}
        shapes = {}
        for name in order:
            if kinds[name] in _SLICES:
                shapes[name] = [(w.name, tuple(w.shape)) for w in model.get_layer(name).weights]
        return cls(groups, kinds, lay_in, lay_out, order, reasons, sum(r.macs for r in rows),
                   M.count_params(model), shapes, {n: costs.get(n, 0) for n in order})

    # -- views ---------------------------------------------------------------------------------
    @property
    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise PocketFlowError(f"no channel group '{name}'")

    def full_keep(self) -> dict[int, np.ndarray]:
        return {g.id: np.arange(g.size) for g in self.groups}

    def mask(self, lay: Layout, keep: dict) -> np.ndarray:
        """Boolean mask over a layout's positions: is this channel kept? (unlisted groups: all kept)"""
        m = np.ones(len(lay), bool)
        for g in np.unique(lay.group):
            if int(g) in keep and len(keep[int(g)]) < self.groups[int(g)].size:
                sel = lay.group == g
                m[sel] = np.isin(lay.index[sel], keep[int(g)])
        return m

    def in_mask(self, layer: str, keep: dict) -> np.ndarray | None:
        lay = self.lay_in.get(layer)
        return None if lay is None else self.mask(lay, keep)

    def out_mask(self, layer: str, keep: dict) -> np.ndarray | None:
        lay = self.lay_out.get(layer)
        return None if lay is None else self.mask(lay, keep)

    # -- analytic costs (exactly what pocketflow.metrics counts on the pruned model) -------------
    def _kept(self, lay: Layout | None, counts: dict) -> tuple[int, int]:
        """(kept positions, all positions) of a layout when `counts[g]` channels of group g stay.
        Hot: the projections call it ~10^5-10^6 times, so each layout's terms are computed once."""
        if lay is None:
            return 0, 0
        cache = self.__dict__.setdefault("_terms", {})
        hit = cache.get(id(lay))
        if hit is None:
            hit = cache[id(lay)] = (tuple((g, n, self.groups[g].size) for g, n in lay.positions.items()), len(lay))
        terms, total = hit
        if len(terms) == 1:
            g, n, size = terms[0]
            return n * counts.get(g, size) // size, total
        return sum(n * counts.get(g, size) // size for g, n, size in terms), total

    def macs(self, counts: dict[int, int]) -> int:
        """MACs of the model with `counts[group]` channels kept per group."""
        total = self.base_macs
        for name, macs in self._orig_macs.items():
            if not macs:
                continue
            kin, nin = self._kept(self.lay_in.get(name), counts)
            kout, nout = self._kept(self.lay_out.get(name), counts)
            kind = self.kinds[name]
            if kind == PRODUCER:
                new = macs * kin * kout // (nin * nout)
            elif kind == SEPARABLE:
                k, filters = self._shapes[name][0][1][:-2], nout
                kk = math.prod(k)
                new = macs // (nin * (kk + filters)) * kin * (kk + kout)
            elif kind == OPAQUE or not nout:
                new = macs
            else:
                new = macs * kout // nout
            total += new - macs
        return int(total)

    def params(self, counts: dict[int, int]) -> int:
        """Weights (float count) of the model with `counts[group]` channels kept per group."""
        total = self.base_params
        for name, shapes in self._shapes.items():
            kin, nin = self._kept(self.lay_in.get(name), counts)
            kout, nout = self._kept(self.lay_out.get(name), counts)
            side = {"in": kin, "out": kout}
            for wname, shape in shapes:
                rules = _rules(self.kinds[name], wname)
                new = list(shape)
                for axis, s in rules.items():
                    new[axis] = side[s] if s != "in*" else kin * (shape[axis] // max(1, nin))
                total += math.prod(new) - math.prod(shape)
        return int(total)

    # -- surgery ---------------------------------------------------------------------------------
    def prune(self, model, keep: dict[int, np.ndarray], overrides: dict | None = None):
        """A new, narrower model keeping channels `keep[group]` (sorted indices) of each group.

        `overrides[layer][weight]` replaces an original weight (same shape) before slicing, e.g.
        a refitted kernel. The input model is not touched.
        """
        import keras
        overrides = overrides or {}
        masks = {n: (self.in_mask(n, keep), self.out_mask(n, keep)) for n in self.order}

        def clone_layer(layer):
            cfg = layer.get_config()
            kind = self.kinds.get(layer.name)
            if kind in (PRODUCER, SEPARABLE):
                key = "units" if "units" in cfg else "filters"
                cfg[key] = int(masks[layer.name][1].sum())
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
            if not layer.weights:  # also skips InputLayers, which clone_model may rename
                continue
            old = model.get_layer(layer.name)
            mine = overrides.get(layer.name, {})
            if self.kinds.get(layer.name) not in _SLICES:
                layer.set_weights(old.get_weights())
                continue
            m_in, m_out = masks[layer.name]
            values = []
            for w in old.weights:
                v = np.asarray(mine.get(w.name, w.numpy()))
                values.append(_slice(v, _rules(self.kinds[layer.name], w.name), m_in, m_out))
            layer.set_weights(values)
        return new


def _rules(kind: str, weight: str) -> dict:
    table = _SLICES[kind]
    return table.get(weight, table.get("*", {}))


def _slice(value: np.ndarray, rules: dict, m_in, m_out) -> np.ndarray:
    for axis, side in rules.items():
        m = m_out if side == "out" else m_in
        if side == "in*":
            m = np.repeat(m_in, value.shape[axis] // len(m_in))
        if m is not None and not m.all():
            value = np.compress(m, value, axis=axis)
    return value
