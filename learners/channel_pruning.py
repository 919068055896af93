"""`channel_pruning`: remove whole filters, and everything that reads them, to get a narrower
dense model that is faster everywhere (no sparse kernels needed).

The channel groups and the surgery come from `learners.graph`. One preserve ratio per prunable
group is the search space (`ratio/<group>`); FLOPs and params of a point are computed
analytically from the channel counts, latency is measured on TFLite (cached per channel counts).
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

from pocketflow.config import Field, non_negative, positive
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
        "calibration_images": Field(int, 512, check=positive,
                                    help="training images for reconstruction / discrimination"),
        "aux_heads": Field(int, 3, check=non_negative,
                           help="auxiliary classifiers for the discrimination criterion"),
    }

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__(cfg, seed)
        self._graphs: dict = {}   # id(model) -> (model, ChannelGraph)
        self._latency: dict = {}  # (id(model), channel counts) -> ms

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

    def max_ratio(self, model, metric: str) -> float:
        return self.predict_ratio(model, self.scale(self.default_params(model), 0.0), metric)

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
        out = super().project(model, params, metric, ratio, tol)
        if metric == "latency":
            out = self._top_up_latency(model, out, ratio)
        else:
            out = self._top_up(model, out, metric, ratio)
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
