"""`channel_pruning`: remove whole filters, and everything that reads them, to get a narrower
dense model that is faster everywhere (no sparse kernels needed).

The channel groups and the surgery come from `learners.graph`. One preserve ratio per prunable
group is the search space (`ratio/<group>`); FLOPs and params of a point are computed
analytically from the channel counts, latency is measured on TFLite (cached per channel counts).

On a FLOPs or params target the projection is latency-aware (`latency_aware`, default on): the
counts that meet the target are re-rounded, each group within `exchange_range` of its projected
ratio, to the ones a per-layer latency table (`learners.latency_table`: every conv measured on
its own on this machine at the counts it may take, cached on disk) predicts to be fastest per
MAC kept. Same target, same search space; fewer of the saved FLOPs are ones XNNPACK cannot turn
into time (docs/benchmarks/channel_pruning.md).
Which channels a group keeps is decided by the `criterion`:

- `l1`, `l2`: norm of each producer's filter, summed over the group's producers.
- `reconstruction` (He et al. 2017): for each group, in network order, sample the inputs of the
  layers that read it on training images; choose channels by LASSO on each channel's
  contribution to those layers' original outputs; then refit their kernels by least squares
  on the already-pruned network's features, so later layers absorb earlier errors.
- `discrimination` (Zhuang et al. 2018): auxiliary classifiers on intermediate feature maps
  (logistic regression on pooled features) add their losses to the task loss; a channel's
  importance is |activation x gradient| of that combined loss where its readers consume it.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from pocketflow.schema import Field, non_negative, positive
from pocketflow.errors import PocketFlowError
from pocketflow.learners.base import Budget, Compressed, Learner, register
from pocketflow.learners.graph import INPUT, OPAQUE, ChannelGraph, analyse
from pocketflow.registry import did_you_mean

CRITERIA = ("l1", "l2", "reconstruction", "discrimination")
_PREFIX = "ratio/"
_COUNT = "count/"  # exact counts off the tile grid, written by `project` only when the target needs them


def _unit(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _range(v):
    ok = (len(v) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
          and 0 < v[0] <= v[1] <= 1)
    return None if ok else "must be [low, high] with 0 < low <= high <= 1"


def _settings(v):
    ok = len(v) > 0 and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p) for p in v)
    return None if ok else "must be a non-empty list of [batch, threads] pairs of positive integers"


def allowed_counts(size: int, multiple: int = 1, tile: int = 0) -> np.ndarray:
    """The channel counts a group of `size` may keep, ascending (always including `size`).

    Multiples of `multiple`; with a `tile`, counts above half a tile must also be multiples of
    the whole tile. XNNPACK computes a layer's output channels in register tiles: on this
    machine (AVX-512) 1-16 output channels cost the same, 17-31 cost more than 32, and 33-63 as
    much as 64 (docs/benchmarks/channel_pruning.md), so 45 of 64 channels save nothing in the
    layer that produces them. Counts up to half a tile stay fine-grained: there the producer's
    cost is flat and the readers' cost falls with every channel.
    """
    c = np.arange(1, size + 1)
    ok = c % max(1, multiple) == 0
    if tile > 1:
        ok &= (c <= tile // 2) | (c % tile == 0)
    ok[-1] = True
    if not ok[:-1].any() and size > 1:  # e.g. multiple > size: allow the smallest step
        ok[min(size, max(1, multiple)) - 1] = True
    return c[ok]


def channels(ratio: float, size: int, multiple: int = 1, tile: int = 0) -> int:
    """Channels kept of `size` at preserve `ratio`: the nearest allowed count (ties: the larger)."""
    if ratio >= 1:
        return size
    ok = allowed_counts(size, multiple, tile)
    want = max(0.0, ratio) * size
    return int(ok[np.argmin(np.abs(ok - want) - 1e-9 * ok)])


def _next_count(count: int, size: int, multiple: int, tile: int) -> int | None:
    ok = allowed_counts(size, multiple, tile)
    above = ok[ok > count]
    return int(above[0]) if len(above) else None


def top_k(scores: np.ndarray, k: int, tie: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the `k` largest scores (ties broken by `tie`, then by index)."""
    tie = np.zeros_like(scores) if tie is None else tie
    order = np.lexsort((np.arange(len(scores)), -tie, -scores))
    return np.sort(order[:k])


@register("channel_pruning")
class ChannelPruning(Learner):
    params = {
        "criterion": Field(str, "l1", choices=CRITERIA, help="how a group chooses its channels"),
        "preserve_ratio": Field(float, 0.5, check=_unit, help="uniform ratio of channels kept (no search)"),
        "ratio_range": Field(list, [0.2, 1.0], check=_range,
                             help="search range of each group's preserve ratio; the low end is the floor"),
        "channel_multiple": Field(int, 1, check=positive, help="keep channel counts at multiples of this"),
        "channel_tile": Field(int, 32, check=non_negative,
                              help="counts above half this are kept at multiples of it (XNNPACK's output "
                                   "tiles; 0 = off): see allowed_counts"),
        "latency_aware": Field(bool, True,
                               help="flops/params targets: among channel counts that meet the target, move "
                                    "pruning to where a per-layer latency table measured on this machine says "
                                    "it buys latency (see _exchange)"),
        "exchange_range": Field(float, 0.25, check=non_negative,
                                help="how far (in preserve ratio) the latency-aware exchange may move a group "
                                     "from the projected point (0 = off)"),
        "latency_settings": Field(list, [[1, 1], [32, 1]], check=_settings,
                                  help="[batch, threads] pairs the latency table is measured at (their mean counts)"),
        "calibration_images": Field(int, 512, check=positive,
                                    help="training images for reconstruction / discrimination"),
        "aux_heads": Field(int, 3, check=non_negative,
                           help="auxiliary classifiers for the discrimination criterion"),
    }

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__(cfg, seed)
        self._graphs: dict = {}   # id(model) -> (model, ChannelGraph)
        self._latency: dict = {}  # (id(model), channel counts) -> ms
        self._tables: dict = {}   # id(model) -> (model, LatencyTable)

    # -- analysis ---------------------------------------------------------------------------------
    def graph(self, model) -> ChannelGraph:
        """The channel groups of `model` (analysed once; skipped layers are reported then)."""
        hit = self._graphs.get(id(model))
        if hit is None or hit[0] is not model:
            from pocketflow.distributed import world
            g = analyse(model)
            if world().is_root:
                for reason in g.reasons:
                    print(f"channel_pruning: skipped {reason}", flush=True)
            hit = self._graphs[id(model)] = (model, g)
        return hit[1]

    def check(self, model) -> None:
        if not self.graph(model).prunable:
            raise PocketFlowError(f"channel_pruning: model '{model.name}' has no channel group that can "
                                  "be pruned (see the skipped layers above)")

    def _counts(self, graph: ChannelGraph, params: dict) -> dict[int, int]:
        """Group id -> channels kept, from `ratio/<group>` entries (preserve_ratio for missing ones)."""
        known = {_PREFIX + g.name: g for g in graph.prunable}
        for key in params:
            if key.startswith(_PREFIX) and key not in known:
                raise PocketFlowError(f"unknown channel group '{key}'{did_you_mean(key, known)}; "
                                      f"prunable groups: {', '.join(known) or 'none'}")
        m, t, default = self.cfg["channel_multiple"], self.cfg["channel_tile"], self.cfg["preserve_ratio"]
        return {g.id: (min(g.size, max(1, int(params[_COUNT + g.name]))) if _COUNT + g.name in params
                       else channels(float(params.get(k, default)), g.size, m, t))
                for k, g in known.items()}

    # -- search & projection ------------------------------------------------------------------------
    def search_space(self, model) -> dict:
        from pocketflow.hpo.space import Float
        lo, hi = self.cfg["ratio_range"]
        return {_PREFIX + g.name: Float(float(lo), float(hi)) for g in self.graph(model).prunable}

    def default_params(self, model) -> dict:
        return {_PREFIX + g.name: float(self.cfg["preserve_ratio"]) for g in self.graph(model).prunable}

    def scale(self, params: dict, alpha: float) -> dict:
        """Ratios move on the line through the floor (ratio_range low) and `params`: alpha=0 is
        the floor everywhere; values above 1 are allowed here and mean "keep all"."""
        lo = float(self.cfg["ratio_range"][0])
        return {k: (lo + alpha * (v - lo) if k.startswith(_PREFIX) else v) for k, v in params.items()}

    def relax(self, params: dict, beta: float) -> dict:
        """Ratios moved towards 1 (keep every channel)."""
        beta = min(1.0, max(0.0, beta))
        return {k: (v + beta * (1.0 - v) if k.startswith(_PREFIX) else v) for k, v in params.items()}

    def predict_ratio(self, model, params: dict, metric: str) -> float:
        g = self.graph(model)
        counts = self._counts(g, params)
        if metric == "flops":
            return g.base_macs / max(1, g.macs(counts))
        if metric in ("params", "compression"):  # the deploy model is float: bytes follow params
            return g.base_params / max(1, g.params(counts))
        if metric == "latency":
            full = {gr.id: gr.size for gr in g.prunable}
            return self._latency_ms(model, g, full) / self._latency_ms(model, g, counts)
        return super().predict_ratio(model, params, metric)

    def project(self, model, params: dict, metric: str, ratio: float, tol: float = 0.01) -> dict:
        """base.project (bisection on `scale`'s alpha) plus two steps integer channels need.

        A point that already compresses more than asked is first stretched along the same line
        until it prunes nothing, so the bisection can pull it back. After the bisection, single
        channels are added back while the target still holds: one channel of a wide residual
        group can be worth several % of the MACs, more than the 1% tolerance.
        """
        params = {k: v for k, v in {**self.default_params(model), **params}.items() if not k.startswith(_COUNT)}
        lo = float(self.cfg["ratio_range"][0])
        if self.predict_ratio(model, params, metric) > ratio * (1 + tol):
            above = [v for k, v in params.items() if k.startswith(_PREFIX) and v > lo]
            params = (self.scale(params, (1 - lo) / (min(above) - lo)) if above else
                      {k: (1.0 if k.startswith(_PREFIX) else v) for k, v in params.items()})
        out = center = super().project(model, params, metric, ratio, tol)
        if metric == "latency":
            out = self._top_up_latency(model, out, ratio)
        else:
            out = self._top_up(model, out, metric, ratio)
            if self.cfg["latency_aware"] and self.cfg["exchange_range"] > 0:
                out = self._top_up(model, self._exchange(model, out, center, metric, ratio), metric, ratio)
        return {k: (min(1.0, v) if k.startswith(_PREFIX) else v) for k, v in out.items()}

    def _top_up(self, model, params: dict, metric: str, ratio: float, tol: float = 0.01) -> dict:
        """Greedy: add the allowed channel step that keeps the most cost while the target holds.
        If tile-sized steps cannot get within `tol` of the target, finish with single steps of
        `channel_multiple` (a few groups then leave the tile grid; the target comes first)."""
        g = self.graph(model)
        cost, base = (g.macs, g.base_macs) if metric == "flops" else (g.params, g.base_params)
        counts = self._counts(g, params)
        m = self.cfg["channel_multiple"]
        counts = self._greedy(g, counts, cost, base, ratio, m, self.cfg["channel_tile"])
        out = {**params, **{_PREFIX + gr.name: counts[gr.id] / gr.size for gr in g.prunable}}
        if self.cfg["channel_tile"] and base / max(1, cost(counts)) > ratio * (1 + tol):
            fine = self._greedy(g, counts, cost, base, ratio, m, 0)
            out.update({_COUNT + gr.name: fine[gr.id] for gr in g.prunable
                        if fine[gr.id] not in allowed_counts(gr.size, m, self.cfg["channel_tile"])})
            out.update({_PREFIX + gr.name: fine[gr.id] / gr.size for gr in g.prunable})
        return out

    @staticmethod
    def _greedy(g, counts: dict, cost, base, ratio: float, m: int, t: int) -> dict:
        while True:
            best = None
            for gr in g.prunable:
                nxt = _next_count(counts[gr.id], gr.size, m, t)
                if nxt is not None:
                    trial = {**counts, gr.id: nxt}
                    c = cost(trial)
                    if c * ratio <= base and (best is None or c > best[0]):
                        best = (c, trial)
            if best is None:
                return counts
            counts = best[1]

    # -- latency-aware projection ---------------------------------------------------------------
    def prepare_search(self, model, metric: str) -> None:
        """Build (or load) the latency table once, before the first trial's projection."""
        if metric in ("flops", "params") and self.cfg["latency_aware"] and self.cfg["exchange_range"] > 0:
            self.latency_table(model)

    def latency_table(self, model):
        """The per-layer latency table of `model` on this machine (measured once, cached on disk)."""
        hit = self._tables.get(id(model))
        if hit is None or hit[0] is not model:
            from pocketflow.learners.latency_table import LatencyTable
            g = self.graph(model)
            hit = self._tables[id(model)] = (model, LatencyTable(model, g, self._side_counts(g),
                                                                 self.cfg["latency_settings"]))
        return hit[1]

    def _side_counts(self, g: ChannelGraph):
        """layout -> the kept-position counts a layer's input or output can take here."""
        m, t, lo = self.cfg["channel_multiple"], self.cfg["channel_tile"], float(self.cfg["ratio_range"][0])

        def side(lay):
            ids = [int(i) for i in np.unique(lay.group)]
            movable = [i for i in ids if i >= 0 and g.groups[i].prunable]
            if not movable:
                return [len(lay)]
            if len(ids) == 1:
                gr, rep = g.groups[ids[0]], len(lay) // g.groups[ids[0]].size
                ok = allowed_counts(gr.size, m, t)
                return [int(rep * c) for c in ok if c >= min(ok[-1], lo * gr.size - 1e-9)]
            return sorted({int(round(len(lay) * f)) for f in np.linspace(lo, 1.0, 9)} | {len(lay)})
        return side

    def _floor(self, gr) -> int:
        ok = allowed_counts(gr.size, self.cfg["channel_multiple"], self.cfg["channel_tile"])
        lo = float(self.cfg["ratio_range"][0]) * gr.size
        return int(ok[ok >= lo - 1e-9][0]) if (ok >= lo - 1e-9).any() else int(ok[-1])

    def _exchange(self, model, params: dict, center: dict, metric: str, ratio: float, slack: float = 0.05,
                  max_counts: int = 9) -> dict:
        """Re-round the projected point so the latency table predicts less time per MAC kept.

        Pruning a channel saves the same MACs wherever it is, but not the same time: below
        XNNPACK's output tile a producer costs the same at 12 channels as at 16, a 28x28 layer
        costs more per MAC than a 7x7 one, while readers' cost falls with every input channel.
        Each group may take any allowed count within `exchange_range` (in preserve ratio) of its
        ratio on the projection's line (`center`), never below the ratio_range floor. Local
        search: set one group to another count, then restore the target greedily (most predicted
        latency per MAC removed first, or least added back), score by predicted latency / MACs
        kept (the latency-to-FLOPs speedup ratio), keep the best while it improves by 0.2%.
        """
        g = self.graph(model)
        table = self.latency_table(model)
        raw, base = (g.macs, g.base_macs) if metric == "flops" else (g.params, g.base_params)
        memo: dict = {}

        def cost(c):
            key = tuple(sorted(c.items()))
            if key not in memo:
                memo[key] = raw(c)
            return memo[key]
        m, t, w = self.cfg["channel_multiple"], self.cfg["channel_tile"], float(self.cfg["exchange_range"])
        lo = float(self.cfg["ratio_range"][0])
        groups = g.prunable
        region = {}
        for gr in groups:
            ok = allowed_counts(gr.size, m, t)
            r = min(1.0, float(center.get(_PREFIX + gr.name, 1.0)))
            ok = ok[ok >= min(lo * gr.size - 1e-9, ok[-1])]
            inside = (ok >= (r - w) * gr.size - 1e-9) & (ok <= (r + w) * gr.size + 1e-9)
            above, below = np.flatnonzero(ok >= r * gr.size - 1e-9), np.flatnonzero(ok <= r * gr.size + 1e-9)
            for i in (above[:1], below[-1:]):  # the grid neighbours of r are always in
                inside[i] = True
            reg = ok[inside]
            if len(reg) > max_counts:  # fine grids (channel_tile 0): evenly spread counts, neighbours kept
                keep = set(np.linspace(0, len(reg) - 1, max_counts).round().astype(int).tolist())
                keep |= {int(i) for i in np.flatnonzero(np.isin(reg, ok[np.concatenate([above[:1], below[-1:]])]))}
                reg = reg[sorted(keep)]
            region[gr.id] = reg
        start = self._counts(g, params)
        counts = {gr.id: int(region[gr.id][np.argmin(np.abs(region[gr.id] - start[gr.id]))]) for gr in groups}

        def meets(c):
            return cost(c) * ratio <= base

        def score(c):
            return table.cost(c) * base / max(1, cost(c))

        def step(c, gid, d):
            reg = region[gid]
            i = int(np.searchsorted(reg, c[gid])) + d
            return int(reg[i]) if 0 <= i < len(reg) and reg[i] != c[gid] else None

        def repair(c, fixed):
            """Greedy: steps down until the target holds, then steps up while it still holds."""
            while not meets(c):
                best = None
                for gr in groups:
                    down = None if gr.id == fixed else step(c, gr.id, -1)
                    if down is not None:
                        trial = {**c, gr.id: down}
                        gain = (table.cost(c) - table.cost(trial)) / max(1, cost(c) - cost(trial))
                        if best is None or gain > best[0]:
                            best = (gain, trial)
                if best is None:
                    return None
                c = best[1]
            while base / max(1, cost(c)) > ratio * (1 + slack / 5):
                best = None
                for gr in groups:
                    up = None if gr.id == fixed else step(c, gr.id, +1)
                    if up is not None:
                        trial = {**c, gr.id: up}
                        if meets(trial):
                            price = (table.cost(trial) - table.cost(c)) / max(1, cost(trial) - cost(c))
                            if best is None or price < best[0]:
                                best = (price, trial)
                if best is None:
                    break
                c = best[1]
            return c if base / max(1, cost(c)) <= ratio * (1 + slack) else None

        counts = repair(counts, None) or start
        if not meets(counts) or score(start) <= score(counts):
            counts = start
        best_s = score(counts)
        for _ in range(2 * len(groups)):
            best = None
            for gr in groups:
                for k in region[gr.id]:
                    if k == counts[gr.id]:
                        continue
                    trial = repair({**counts, gr.id: int(k)}, gr.id)
                    if trial is not None and meets(trial):
                        sc = score(trial)
                        if best is None or sc < best[0]:
                            best = (sc, trial)
            if best is None or best[0] >= best_s * (1 - 2e-3):
                break
            best_s, counts = best
        out = {k: v for k, v in params.items() if not k.startswith(_COUNT)}
        out.update({_PREFIX + gr.name: counts[gr.id] / gr.size for gr in groups})
        out.update({_COUNT + gr.name: counts[gr.id] for gr in groups
                    if channels(counts[gr.id] / gr.size, gr.size, m, t) != counts[gr.id]})
        return out

    def _top_up_latency(self, model, params: dict, ratio: float, budget: int = 16) -> dict:
        """Channel counts jump (tiles), so the measured latency along `scale` jumps too and the
        bisection can stop well past the target. Add channels back, one allowed step of one
        group at a time, largest MACs gain first, while the measured speedup still meets the
        target; at most `budget` extra measurements (each is a TFLite conversion)."""
        g = self.graph(model)
        counts = self._counts(g, params)
        m, t = self.cfg["channel_multiple"], self.cfg["channel_tile"]
        full = self._latency_ms(model, g, {gr.id: gr.size for gr in g.prunable})
        tried: set = set()
        while len(tried) < budget:
            cands = []
            for gr in g.prunable:
                nxt = _next_count(counts[gr.id], gr.size, m, t)
                if nxt is not None:
                    trial = {**counts, gr.id: nxt}
                    key = tuple(sorted(trial.items()))
                    if key not in tried:
                        cands.append((g.macs(trial), key, trial))
            if not cands:
                break
            for _, key, trial in sorted(cands, key=lambda c: -c[0]):
                if len(tried) >= budget:
                    break
                tried.add(key)
                if full / self._latency_ms(model, g, trial) >= ratio:
                    counts = trial
                    break
            else:
                break
        return {**params, **{_PREFIX + gr.name: counts[gr.id] / gr.size for gr in g.prunable}}

    def _latency_ms(self, model, graph: ChannelGraph, counts: dict) -> float:
        """TFLite latency (batch 1, 1 thread) of the model pruned to `counts`, cached: the
        fastest of 3 x 20 invokes, which other jobs on a shared machine can only slow down
        (a median moves with their load)."""
        key = (id(model), tuple(sorted(counts.items())))
        if key not in self._latency:
            import time

            from pocketflow import metrics as M
            from pocketflow.distributed import world
            from pocketflow.export import to_tflite
            pruned = graph.prune(model, {gid: np.arange(k) for gid, k in counts.items()})
            run = M.TFLiteRunner(to_tflite(pruned), threads=1, batch=1)
            x = np.random.default_rng(0).random((1, *model.input_shape[1:]), dtype=np.float32)
            best = float("inf")
            for i in range(65):
                t0 = time.perf_counter()
                run(x)
                if i >= 5:  # warm-up
                    best = min(best, (time.perf_counter() - t0) * 1e3)
            self._latency[key] = world().mean(best)  # every rank must project to the same point
        return self._latency[key]

    # -- compression --------------------------------------------------------------------------------
    def compress(self, model, params: dict, data, budget: Budget, hooks=()) -> Compressed:
        from pocketflow import metrics as M
        g = self.graph(model)
        counts = self._counts(g, params)
        crit = self.cfg["criterion"]
        keep, overrides, notes = _CRITERIA[crit](self, model, g, counts, data)
        pruned = g.prune(model, keep, overrides)
        hist = self.fine_tune(pruned, data, budget, teacher=model, hooks=hooks)
        info = {"criterion": crit,
                "channels": {gr.name: [int(counts[gr.id]), gr.size] for gr in g.prunable},
                "ratios": {gr.name: round(counts[gr.id] / gr.size, 4) for gr in g.prunable},
                "groups": {gr.name: gr.producers for gr in g.prunable},
                "skipped_layers": list(g.reasons), **notes}
        return Compressed(model=pruned, deploy=pruned, size_bytes=M.float_bytes(pruned), info=info,
                          history=hist)

    def _calibration(self, data):
        if data is None or not len(getattr(data, "x_train", ())):
            raise PocketFlowError(f"criterion '{self.cfg['criterion']}' needs training images")
        n = min(self.cfg["calibration_images"], len(data.x_train))
        idx = np.sort(np.random.default_rng(self.seed).permutation(len(data.x_train))[:n])
        return data.x_train[idx], data.y_train[idx]


# -- criteria: (learner, model, graph, counts, data) -> (keep, overrides, info notes) ----------------

def _pruned(graph: ChannelGraph, counts: dict):
    return [g for g in graph.prunable if counts[g.id] < g.size]


def _kernel(layer):
    """The weight whose last axis is the layer's output channels (pointwise for separable)."""
    ws = {w.name: w for w in layer.weights}
    return ws["kernel" if "kernel" in ws else "pointwise_kernel"].numpy()


def _norm(model, group, order: int) -> np.ndarray:
    """L1/L2 norm of each output filter, summed over the group's producers."""
    score = np.zeros(group.size)
    for name in group.producers:
        k = np.abs(_kernel(model.get_layer(name)))
        score += (k ** order).reshape(-1, k.shape[-1]).sum(0) ** (1.0 / order)
    return score


def _norm_criterion(order: int):
    def select(learner, model, graph, counts, data):
        return {g.id: top_k(_norm(model, g, order), counts[g.id]) for g in _pruned(graph, counts)}, {}, {}
    return select


# -- reconstruction -----------------------------------------------------------------------------------

def _run(model, tensors: list, x: np.ndarray, batch: int = 64):
    """Yield the values of `tensors` (KerasTensors of `model`) batch by batch (inference mode)."""
    import keras
    import tensorflow as tf
    probe = keras.Model(model.inputs, tensors)
    fn = tf.function(lambda b: probe(b, training=False), reduce_retracing=True)
    for i in range(0, len(x), batch):
        out = fn(tf.constant(x[i:i + batch]))
        yield [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]


class _Rows:
    """A reader layer's input as regression rows (n, S*C_in): its kernel's receptive-field
    patches (Conv2D) or input vectors (Dense), at fixed sampled output positions."""

    SUPPORTED = ("Conv2D", "Dense")

    def __init__(self, layer, n_images: int, per_image: int, rng):
        self.layer = layer
        self.kernel = _kernel(layer)
        self.taps = math.prod(self.kernel.shape[:-2])  # S: kernel positions per input channel
        shape = tuple(layer.output.shape)
        spots = math.prod(shape[1:-1]) if len(shape) > 2 else 1
        self.pos = None if spots == 1 else rng.integers(0, spots, (n_images, per_image))

    def __call__(self, x: np.ndarray, start: int) -> np.ndarray:
        import tensorflow as tf
        L = self.layer
        if type(L).__name__ == "Conv2D":
            kh, kw = L.kernel_size
            x = tf.image.extract_patches(x, [1, kh, kw, 1], [1, *L.strides, 1], [1, *L.dilation_rate, 1],
                                         L.padding.upper()).numpy()
        x = x.reshape(len(x), -1, x.shape[-1])
        if self.pos is not None:
            x = np.take_along_axis(x, self.pos[start:start + len(x), :, None], axis=1)
        return x.reshape(-1, x.shape[-1])


def _rows(model, readers: dict, x: np.ndarray, then=None) -> dict:
    """name -> (n, S*C_in) rows of each reader's input in `model` (which may be pruned), or
    `then(name, rows)` of them, applied batch by batch to keep memory small."""
    names = list(readers)
    out = {n: [] for n in names}
    start = 0
    for vals in _run(model, [model.get_layer(n).input for n in names], x):
        for n, v in zip(names, vals):
            rows = readers[n](v, start)
            out[n].append(rows if then is None else then(n, rows))
        start += len(vals[0])
    return {n: np.concatenate(v) for n, v in out.items()}


def _expand(rows: np.ndarray, mask: np.ndarray, s: int) -> np.ndarray:
    """Rows of a pruned reader back in the original (S, C_in) coordinates, zeros where pruned."""
    if mask.all():
        return rows
    full = np.zeros((len(rows), s, len(mask)), rows.dtype)
    full[:, :, mask] = rows.reshape(len(rows), s, -1)
    return full.reshape(len(rows), -1)


def _lasso_gram(rows, kernel, target, chan, size):
    """Gram matrix and correlation of the per-channel contributions to a reader's output.

    Channel c contributes Z_c = rows[:, q in c] @ kernel[q in c] to the output; the LASSO over
    channel weights b minimises |y - sum_c b_c Z_c|^2, whose normal equations only need
    <Z_c, Z_d> and <Z_c, y>, computed here without forming the (rows, C, C_out) tensor Z.
    `y` is the target minus what the channels of other groups contribute.
    """
    mine = chan >= 0
    xg, kg = rows[:, mine], kernel[mine]
    y = target - rows[:, ~mine] @ kernel[~mine]
    onehot = np.eye(size)[chan[mine]]
    w = 1.0 / max(float(np.mean(target ** 2)), 1e-12)  # every reader counts the same
    return (w * onehot.T @ (((xg.T @ xg) * (kg @ kg.T)) @ onehot),
            w * onehot.T @ (xg * (y @ kg.T)).sum(0))


def _lasso_select(gram, xy, k: int, n: int) -> np.ndarray:
    """The k channels that stay longest on the LASSO path (least-angle regression)."""
    from sklearn.linear_model import lars_path_gram
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate (dead) channels are expected
        _, _, coefs = lars_path_gram(xy, gram, n_samples=n, method="lasso", max_iter=10 * len(xy))
    enough = (coefs != 0).sum(0) >= k
    j = int(np.argmax(enough)) if enough.any() else coefs.shape[1] - 1
    return top_k(np.abs(coefs[:, j]), k, tie=np.diag(gram))


def _refit(rows, cols, target, kernel) -> np.ndarray | None:
    """Least-squares kernel on the kept input columns (ridge-stabilised), or None if too few rows."""
    a = rows[:, cols]
    if len(a) < 2 * a.shape[1]:
        return None  # e.g. a wide Dense behind Flatten with few calibration images
    ata = a.T @ a
    ata[np.diag_indices_from(ata)] += 1e-4 * np.trace(ata) / len(ata) + 1e-12
    k = np.zeros_like(kernel)
    k[cols] = np.linalg.solve(ata, a.T @ target)
    return k


def _reconstruction(learner, model, graph: ChannelGraph, counts, data):
    """He et al. 2017, group by group in network order (see the module docstring)."""
    x, _ = learner._calibration(data)
    rng = np.random.default_rng(learner.seed)
    todo = _pruned(graph, counts)
    readers = {n: _Rows(model.get_layer(n), len(x), 8, rng) for n in sorted({c for g in todo for c in g.consumers})
               if type(model.get_layer(n)).__name__ in _Rows.SUPPORTED}
    kernels = {n: r.kernel.reshape(-1, r.kernel.shape[-1]) for n, r in readers.items()}  # (S*C_in, C_out)
    target = _rows(model, readers, x, then=lambda n, r: r @ kernels[n])  # the original outputs
    keep, overrides, refit, fallback = graph.full_keep(), {}, [], []
    for g in todo:
        mine = [c for c in g.consumers if c in readers]
        if not mine:  # nothing to reconstruct against (e.g. only SeparableConv readers)
            keep[g.id] = top_k(_norm(model, g, 1), counts[g.id])
            fallback.append(g.name)
            continue
        # features of the network pruned so far (refits included), in the original coordinates
        changed = overrides or any(len(v) < graph.groups[i].size for i, v in keep.items())
        current = graph.prune(model, keep, overrides) if changed else model
        feats = {n: _expand(r, graph.mask(graph.lay_in[n], keep), readers[n].taps)
                 for n, r in _rows(current, {n: readers[n] for n in mine}, x).items()}
        gram, xy = np.zeros((g.size, g.size)), np.zeros(g.size)
        for n in mine:
            lay = graph.lay_in[n]
            chan = np.tile(np.where(lay.group == g.id, lay.index, -1), readers[n].taps)
            gg, gx = _lasso_gram(feats[n], kernels[n], target[n], chan, g.size)
            gram, xy = gram + gg, xy + gx
        keep[g.id] = _lasso_select(gram, xy, counts[g.id], len(x))
        for n in mine:
            k = _refit(feats[n], np.tile(graph.mask(graph.lay_in[n], keep), readers[n].taps), target[n], kernels[n])
            if k is not None:
                kernels[n] = k
                overrides[n] = {"kernel": k.reshape(readers[n].kernel.shape).astype(np.float32)}
                refit += [n] if n not in refit else []
    return keep, overrides, {"refit_layers": refit, "norm_fallback_groups": fallback}


# -- discrimination -----------------------------------------------------------------------------------

def _rank(layer) -> int:
    """Rank of the layer's output (0 for a layer called more than once: it has no single output)."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return 0


def _aux_heads(model, graph: ChannelGraph, x, y, n_heads: int, seed: int):
    """Logistic-regression classifiers on spatially pooled feature maps at evenly spaced depths."""
    from sklearn.linear_model import LogisticRegression
    cands = [n for n in graph.order if graph.kinds[n] not in (INPUT, OPAQUE)
             and _rank(model.get_layer(n)) >= 3]
    if not cands or n_heads == 0 or len(np.unique(y)) < 2:
        return []
    picks = sorted({cands[min(len(cands) - 1, (i + 1) * len(cands) // (n_heads + 1))] for i in range(n_heads)})
    pooled = {n: [] for n in picks}
    for vals in _run(model, [model.get_layer(n).output for n in picks], x):
        for n, v in zip(picks, vals):
            pooled[n].append(v.reshape(len(v), -1, v.shape[-1]).mean(1))
    heads = []
    for n in picks:
        f = np.concatenate(pooled[n])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(max_iter=300, random_state=seed).fit(f, y)
        w, b = clf.coef_.T, clf.intercept_
        if w.shape[1] == 1:  # binary: sklearn keeps one logit
            w, b = np.concatenate([-w, w], 1) / 2, np.concatenate([-b, b]) / 2
        heads.append((n, w.astype(np.float32), b.astype(np.float32), clf.classes_, float(clf.score(f, y))))
    return heads


def _add_by_channel(values: np.ndarray, lay, out: dict) -> None:
    """Add per-position values (batch, positions of `lay`) into out[group] (batch, channels)."""
    for gid, acc in out.items():
        cols = lay.group == gid
        if cols.any():
            np.add.at(acc.T, lay.index[cols], values[:, cols].T)


def _discrimination(learner, model, graph: ChannelGraph, counts, data):
    """Zhuang et al. 2018's importance: |activation x gradient| of task + auxiliary losses."""
    import keras
    import tensorflow as tf

    from pocketflow.training import _from_logits
    x, y = learner._calibration(data)
    todo = _pruned(graph, counts)
    heads = _aux_heads(model, graph, x, y, learner.cfg["aux_heads"], learner.seed)
    readers = sorted({c for g in todo for c in g.consumers})
    inputs = list({id(model.get_layer(n).input): model.get_layer(n).input for n in readers}.values())
    slot = {n: [id(t) for t in inputs].index(id(model.get_layer(n).input)) for n in readers}
    lay = {slot[n]: graph.lay_in[n] for n in readers}
    probe = keras.Model(model.inputs, [model.outputs[0]] + [model.get_layer(h[0]).output for h in heads]
                        + inputs + [model.get_layer(n).output for n in readers])
    from_logits = _from_logits(model)
    imp = {g.id: np.zeros(g.size) for g in todo}
    nh, ni = len(heads), len(inputs)

    def ce(labels, logits, logit=True):
        return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=logit))

    for i in range(0, len(x), 64):
        xb, yb = tf.constant(x[i:i + 64]), y[i:i + 64]
        with tf.GradientTape() as tape:
            out = probe(xb, training=False)
            loss = ce(yb, out[0], from_logits)
            for (name, w, b, classes, _), t in zip(heads, out[1:1 + nh]):
                pooled = tf.reduce_mean(tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]]), 1)
                loss = loss + ce(np.searchsorted(classes, yb), pooled @ w + b)
        acts, outs = out[1 + nh:1 + nh + ni], out[1 + nh + ni:]
        g_out = tape.gradient(loss, outs)
        # the gradient reaching each reader's input through that reader only: pruning a channel
        # is zeroing it where it is read, not in the residual stream that carries it on
        with tf.GradientTape() as tape2:
            tape2.watch(acts)
            s = tf.add_n([tf.constant(0.0)] + [
                tf.reduce_sum(tf.stop_gradient(gy) * model.get_layer(n)(acts[slot[n]], training=False))
                for n, gy in zip(readers, g_out) if gy is not None])
        g_in = tape2.gradient(s, acts)
        per_sample = {g.id: np.zeros((len(yb), g.size)) for g in todo}
        for k, (a, ga) in enumerate(zip(acts, g_in)):
            if ga is not None:
                ag = (a * ga).numpy().reshape(len(yb), -1, a.shape[-1]).sum(1)  # (batch, positions)
                _add_by_channel(ag, lay[k], per_sample)
        for g in todo:
            imp[g.id] += np.abs(per_sample[g.id]).sum(0)  # a channel's effect per image, then summed
    keep = {g.id: top_k(imp[g.id], counts[g.id]) for g in todo}
    return keep, {}, {"aux_heads": {h[0]: round(h[4], 4) for h in heads}}


_CRITERIA = {"l1": _norm_criterion(1), "l2": _norm_criterion(2), "reconstruction": _reconstruction,
             "discrimination": _discrimination}
