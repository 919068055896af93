"""The `channel_pruning` learner: settings, search space, projection onto a target and
compression, each delegated to the module that owns it (see the package docstring)."""
from __future__ import annotations

from pocketflow.errors import PocketFlowError
from pocketflow.learners.base import Budget, Compressed, Learner, register
from pocketflow.learners.channel_pruning import counts as C
from pocketflow.learners.channel_pruning.counts import COUNT, PREFIX, channels
from pocketflow.learners.channel_pruning.criteria import CRITERIA
from pocketflow.learners.channel_pruning.exchange import Exchange, region
from pocketflow.learners.channel_pruning.graph import ChannelGraph
from pocketflow.learners.channel_pruning.groups import analyse
from pocketflow.learners.channel_pruning.latency_table import LatencyTable, pruned_ms, side_counts
from pocketflow.registry import did_you_mean
from pocketflow.schema import Field, non_negative, positive


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


@register("channel_pruning")
class ChannelPruning(Learner):
    params = {
        "criterion": Field(str, "l1", choices=tuple(CRITERIA), help="how a group chooses its channels"),
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
                                    "it buys latency (see channel_pruning.exchange)"),
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
        self._latency: dict = {}  # (id(model), deploy, channel counts) -> ms
        self._tables: dict = {}   # (id(model), deploy) -> (model, LatencyTable)

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

    def _grid(self) -> tuple[int, int]:
        return self.cfg["channel_multiple"], self.cfg["channel_tile"]

    def _counts(self, graph: ChannelGraph, params: dict) -> dict[int, int]:
        """Group id -> channels kept, from `ratio/<group>` entries (preserve_ratio for missing ones)."""
        known = {PREFIX + g.name: g for g in graph.prunable}
        for key in params:
            if key.startswith(PREFIX) and key not in known:
                raise PocketFlowError(f"unknown channel group '{key}'{did_you_mean(key, known)}; "
                                      f"prunable groups: {', '.join(known) or 'none'}")
        (m, t), default = self._grid(), self.cfg["preserve_ratio"]
        return {g.id: (min(g.size, max(1, int(params[COUNT + g.name]))) if COUNT + g.name in params
                       else channels(float(params.get(k, default)), g.size, m, t))
                for k, g in known.items()}

    # -- search & projection ------------------------------------------------------------------------
    def search_space(self, model) -> dict:
        from pocketflow.hpo.space import Float
        lo, hi = self.cfg["ratio_range"]
        return {PREFIX + g.name: Float(float(lo), float(hi)) for g in self.graph(model).prunable}

    def default_params(self, model) -> dict:
        return {PREFIX + g.name: float(self.cfg["preserve_ratio"]) for g in self.graph(model).prunable}

    def scale(self, params: dict, alpha: float) -> dict:
        """Ratios move on the line through the floor (ratio_range low) and `params`: alpha=0 is
        the floor everywhere; values above 1 are allowed here and mean "keep all"."""
        lo = float(self.cfg["ratio_range"][0])
        return {k: (lo + alpha * (v - lo) if k.startswith(PREFIX) else v) for k, v in params.items()}

    def relax(self, params: dict, beta: float) -> dict:
        """Ratios moved towards 1 (keep every channel)."""
        beta = min(1.0, max(0.0, beta))
        return {k: (v + beta * (1.0 - v) if k.startswith(PREFIX) else v) for k, v in params.items()}

    def predict_ratio(self, model, params: dict, metric: str) -> float:
        g = self.graph(model)
        counts = self._counts(g, params)
        if metric == "flops":
            return g.base_macs / max(1, g.macs(counts))
        if metric in ("params", "packed_size"):  # the deploy model is float: bytes follow params
            return g.base_params / max(1, g.params(counts))
        if metric == "latency":
            full = {gr.id: gr.size for gr in g.prunable}
            # against the float baseline file, whatever the run ships (an int8 file may be faster or slower)
            return self._latency_ms(model, g, full, "float") / self._latency_ms(model, g, counts, self._deploy())
        return super().predict_ratio(model, params, metric)

    def predicted_reps(self, model, params: dict, reps: dict | None = None) -> dict:
        """Every kernel dense, at its pruned shape (a chain's later steps describe those)."""
        from dataclasses import replace

        from pocketflow.learners.accounting import base_reps
        g = self.graph(model)
        counts = self._counts(g, params)
        reps = dict(base_reps(model) if reps is None else reps)
        return {n: replace(r, shape=g.pruned_shape(n, r.shape, counts)) for n, r in reps.items()}

    def project(self, model, params: dict, metric: str, ratio: float, tol: float = 0.01) -> dict:
        """base.project (bisection on `scale`'s alpha) plus two steps integer channels need.

        A point that already compresses more than asked is first stretched along the same line
        until it prunes nothing, so the bisection can pull it back. After the bisection, single
        channels are added back while the target still holds: one channel of a wide residual
        group can be worth several % of the MACs, more than the 1% tolerance.
        """
        params = {k: v for k, v in {**self.default_params(model), **params}.items() if not k.startswith(COUNT)}
        lo = float(self.cfg["ratio_range"][0])
        if self.predict_ratio(model, params, metric) > ratio * (1 + tol):
            above = [v for k, v in params.items() if k.startswith(PREFIX) and v > lo]
            params = (self.scale(params, (1 - lo) / (min(above) - lo)) if above else
                      {k: (1.0 if k.startswith(PREFIX) else v) for k, v in params.items()})
        out = center = super().project(model, params, metric, ratio, tol)
        if metric == "latency":
            out = self._top_up_latency(model, out, ratio)
        else:
            out = self._top_up(model, out, metric, ratio, tol)
            if self.cfg["latency_aware"] and self.cfg["exchange_range"] > 0:
                out = self._exchange(model, out, center, metric, ratio, tol)
                out = self._top_up(model, out, metric, ratio, tol)
        return {k: (min(1.0, v) if k.startswith(PREFIX) else v) for k, v in out.items()}

    def _cost(self, g: ChannelGraph, metric: str):
        return (g.macs, g.base_macs) if metric == "flops" else (g.params, g.base_params)

    def _top_up(self, model, params: dict, metric: str, ratio: float, tol: float) -> dict:
        g = self.graph(model)
        return C.top_up(g, params, self._counts(g, params), *self._cost(g, metric), ratio, *self._grid(), tol)

    def _exchange(self, model, params: dict, center: dict, metric: str, ratio: float, tol: float) -> dict:
        """`params` re-rounded by the latency-aware exchange (channel_pruning.exchange): on the
        grid and within `tol` of the target, so the top-up after it stays on the grid."""
        g = self.graph(model)
        (m, t), groups = self._grid(), g.prunable
        reg = region(groups, center, m, t, float(self.cfg["exchange_range"]), float(self.cfg["ratio_range"][0]))
        grid = {gr.id: C.allowed_counts(gr.size, m, t) for gr in groups}
        ex = Exchange(groups, reg, *self._cost(g, metric), ratio, self.latency_table(model), grid, tol)
        return C.to_params(g, params, ex.search(self._counts(g, params)), m, t)

    def _top_up_latency(self, model, params: dict, ratio: float) -> dict:
        g = self.graph(model)
        counts = self._counts(g, params)
        full = self._latency_ms(model, g, {gr.id: gr.size for gr in g.prunable}, "float")
        return C.top_up_latency(g, params, counts, lambda c: full / self._latency_ms(model, g, c, self._deploy()), ratio,
                                *self._grid())

    # -- latency ------------------------------------------------------------------------------------
    def prepare_search(self, model, metric: str) -> None:
        """Build (or load) the latency table once, before the first trial's projection."""
        if metric in ("flops", "params") and self.cfg["latency_aware"] and self.cfg["exchange_range"] > 0:
            self.latency_table(model)

    def _deploy(self) -> str:
        """The TFLite type the run ships (the latency table and the latency target time it)."""
        d = getattr(self.shipped, "deploy", "float")
        return d if d in ("float", "int8") else "float"

    def latency_table(self, model) -> LatencyTable:
        """The per-layer latency table of `model` on this machine for the shipped file type
        (measured once, cached on disk)."""
        key = (id(model), self._deploy())
        hit = self._tables.get(key)
        if hit is None or hit[0] is not model:
            g = self.graph(model)
            sides = side_counts(g, *self._grid(), float(self.cfg["ratio_range"][0]))
            hit = self._tables[key] = (model, LatencyTable(g.model, g, sides, self.cfg["latency_settings"],
                                                           deploy=self._deploy()))
        return hit[1]

    def _latency_ms(self, model, graph: ChannelGraph, counts: dict, deploy: str = "float") -> float:
        """Measured TFLite latency of `model` pruned to `counts` and converted as `deploy`
        (latency_table.pruned_ms), cached."""
        key = (id(model), deploy, tuple(sorted(counts.items())))
        if key not in self._latency:
            from pocketflow.distributed import world
            self._latency[key] = world().mean(pruned_ms(model, graph, counts, deploy))  # every rank projects alike
        return self._latency[key]

    # -- compression --------------------------------------------------------------------------------
    def compress(self, model, params: dict, data, budget: Budget, hooks=()) -> Compressed:
        from pocketflow import metrics as M
        g = self.graph(model)
        counts = self._counts(g, params)
        crit = self.cfg["criterion"]
        keep, overrides, notes = CRITERIA[crit](self, g.model, g, counts, data)  # nested models inlined
        pruned = g.prune(model, keep, overrides)
        hist = self.fine_tune(pruned, data, budget, teacher=model, hooks=hooks, params=params)
        info = {"criterion": crit,
                "channels": {gr.name: [int(counts[gr.id]), gr.size] for gr in g.prunable},
                "ratios": {gr.name: round(counts[gr.id] / gr.size, 4) for gr in g.prunable},
                "groups": {gr.name: gr.producers for gr in g.prunable},
                "skipped_layers": list(g.reasons), **notes}
        return Compressed(model=pruned, deploy=pruned, size_bytes=M.float_bytes(pruned), info=info,
                          history=hist)
