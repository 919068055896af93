"""The result of the channel-group analysis (`groups.analyse`): groups, per-layer layouts, and
what follows from them: channel masks, the analytic cost model and the surgery."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.learners.channel_pruning import surgery
from pocketflow.learners.topology import OPAQUE, PRODUCER, SEPARABLE


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


class ChannelGraph:
    """Groups, per-layer layouts (with root group ids) and what follows from them."""

    def __init__(self, groups, kinds, specs, lay_in, lay_out, order, reasons, model):
        from pocketflow import metrics as M
        self.groups: list[Group] = groups
        self.kinds: dict[str, str] = kinds
        self.specs: dict = specs          # layer -> LayerSpec (layers that are not opaque)
        self.lay_in: dict[str, Layout] = lay_in
        self.lay_out: dict[str, Layout] = lay_out
        self.order: list[str] = order
        self.reasons: list[str] = reasons
        self.model = model                       # the model analysed (nested models inlined)
        self.inlined: set[str] = set()           # names of the nested models inlined
        self.weight_rules: dict[str, dict] = {}  # layer -> weight -> {axis: side}, sliced layers only
        self._shapes: dict[str, list] = {}       # layer -> [(weight name, shape)], sliced layers only
        for name, spec in specs.items():
            if spec.weights and kinds[name] != OPAQUE:
                ws = model.get_layer(name).weights
                self.weight_rules[name] = {w.name: spec.rules(w.name) for w in ws}
                self._shapes[name] = [(w.name, tuple(w.shape)) for w in ws]
        rows = M.layer_costs(model)
        costs = {r.name: r.macs for r in rows}
        self.base_macs, self.base_params = sum(r.macs for r in rows), M.count_params(model)
        self._orig_macs = {n: costs.get(n, 0) for n in order}  # layer -> MACs of the unpruned layer

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

    def widths(self, counts: dict[int, int], names=None) -> tuple[np.ndarray, np.ndarray]:
        """(kept input widths, kept output widths) of the layers `names` (default `order`; 0 for
        a side without a layout), `_kept` for all of them in one numpy pass: the exchange costs
        ~10^5 candidates of models with hundreds of layers (DenseNet121: 98 s in Python loops)."""
        names = tuple(self.order if names is None else names)
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(names)
        if plan is None:
            rows, gs, ns, sizes = [], [], [], []
            lays = [side.get(n) for side in (self.lay_in, self.lay_out) for n in names]
            for r, lay in enumerate(lays):
                for g, n in (lay.positions.items() if lay is not None else ()):
                    rows.append(r), gs.append(g), ns.append(n), sizes.append(self.groups[g].size)
            plan = plans[names] = tuple(np.asarray(v, np.int64) for v in (rows, gs, ns, sizes))
        rows, gs, ns, sizes = plan
        c = self.__dict__.get("_sizes")
        if c is None:
            c = self.__dict__["_sizes"] = np.array([g.size for g in self.groups], np.int64)
        c = c.copy()
        if counts:
            c[list(counts)] = list(counts.values())
        kept = np.bincount(rows, ns * c[gs] // sizes, minlength=2 * len(names)).astype(np.int64)
        return kept[:len(names)], kept[len(names):]

    def _macs_plan(self):
        """Per layer with MACs: (macs, full in, full out, kind code, separable kernel size)."""
        plan = self.__dict__.get("_mplan")
        if plan is None:
            names = tuple(n for n, m in self._orig_macs.items() if m)
            nin, nout = self.widths({}, names)
            code = {PRODUCER: 0, SEPARABLE: 1, OPAQUE: 2}  # the order _macs_slow tests them in
            kinds = [code.get(self.kinds[n], 2 if not nout[i] else 3) for i, n in enumerate(names)]
            kk = [math.prod(self._shapes[n][0][1][:-2]) if k == 1 else 0 for n, k in zip(names, kinds)]
            macs = [self._orig_macs[n] for n in names]
            exact = all(m * max(1, a) * max(1, b) < 2 ** 62 for m, a, b in zip(macs, nin, nout))
            plan = self.__dict__["_mplan"] = (names, np.asarray(macs, np.int64), nin, nout,
                                              np.asarray(kinds), np.asarray(kk, np.int64), exact)
        return plan

    def macs(self, counts: dict[int, int]) -> int:
        """MACs of the model with `counts[group]` channels kept per group (integer arithmetic)."""
        names, macs, nin, nout, kind, kk, exact = self._macs_plan()
        if not exact:  # int64 could overflow: Python integers
            return self._macs_slow(counts)
        kin, kout = self.widths(counts, names)
        one = np.maximum(1, nin * nout)
        new = np.where(kind == 0, macs * kin * kout // one,
                       np.where(kind == 1, macs // np.maximum(1, nin * (kk + nout)) * kin * (kk + kout),
                                np.where(kind == 2, macs, macs * kout // np.maximum(1, nout))))
        return int(self.base_macs + int((new - macs).sum()))

    def _macs_slow(self, counts: dict[int, int]) -> int:
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
            kout, _ = self._kept(self.lay_out.get(name), counts)
            rules = self.weight_rules[name]
            for wname, shape in shapes:
                total += math.prod(surgery.sliced_shape(shape, rules[wname], kin, nin, kout)) - math.prod(shape)
        return int(total)

    def pruned_shape(self, layer: str, shape: tuple, counts: dict[int, int]) -> tuple:
        """The shape a weight of `layer` (its unpruned `shape`) has with `counts` channels kept;
        unchanged for a layer the graph does not slice."""
        for wname, s in self._shapes.get(layer, ()):
            if tuple(s) == tuple(shape):
                kin, nin = self._kept(self.lay_in.get(layer), counts)
                kout, _ = self._kept(self.lay_out.get(layer), counts)
                return tuple(surgery.sliced_shape(s, self.weight_rules[layer][wname], kin, nin, kout))
        return tuple(shape)

    # -- surgery ---------------------------------------------------------------------------------
    def prune(self, model, keep: dict[int, np.ndarray], overrides: dict | None = None):
        """A new, narrower model keeping channels `keep[group]` (see `surgery.prune`)."""
        return surgery.prune(self, model, keep, overrides)
