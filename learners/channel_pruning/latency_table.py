"""Per-layer latency lookup table for channel pruning (NetAdapt, Yang et al. 2018, section 3.2).

Every Conv2D / Dense / SeparableConv2D of the model is rebuilt on its own at its input
resolution with narrower inputs or outputs, converted to TFLite and timed on this machine with
the same interpreter the exported model runs on (XNNPACK), at the batch sizes and thread counts
asked for. A layer's latency at (c_in, c_out) kept channels is predicted as

    t(c_in, c_out) = t_out(c_out) * t_in(c_in) / t(C_in, C_out)

with t_out measured at every channel count the learner may keep on the output side (the full
input) and t_in on the input side (the full output), interpolated between measured counts: on
XNNPACK the output-channel cost is a staircase (register tiles) and the input-channel cost close
to linear (docs/benchmarks/channel_pruning.md), and the product keeps both. The model's
predicted latency is the sum over its layers; what the table leaves out (element-wise ops,
pooling) is left out of every candidate alike, so it ranks architectures, it does not replace
the measured `latency` target.

Only what the projection can ask for is measured, each shape once (docs/latency_table.md):
counts on the tile grid above the ratio floor, every 4th below 16, and above 128 only the
`_anchor` counts, the same for every layer (linear between them: on tile multiples the cost
is close to linear); a concatenation's width at the tile multiples. An entry's key is the layer
signature (class, config, input resolution, c_in, c_out), so equal shapes share it across
layers and models. Timings (latency_measure.py) are the fastest of a few invokes (other jobs
on a shared machine can only slow an invoke down) and are cached in a JSON file keyed by
machine and TensorFlow version: a model's table is measured once per machine (about 10-60 s
for a keras.applications model at a small input), with progress on the way.

`deploy` picks the TFLite file measured: "float" (the default) or "int8", full-integer
(`to_tflite(m, "int8", representative, weight_scales="per_channel")`, int8 inputs and outputs,
the file a run that quantizes ships). For int8 the calibration images are uniform random in
[0, 1] (the range of real inputs; calibration quality does not move timing). int8 entries are
cached under their own keys (the float keys are unchanged), so the two never mix. Two rules
differ for int8 (docs/benchmarks/int8_latency.md): a layer is timed by bare invokes (the
runner's numpy quantization of a whole int8 feature map is no cost a deployed layer pays), and
a count between measured ones at most 4 apart takes the next measured count's time (int8 kernels
pad the input channels to a tile as well as the output ones: both sides are staircases; across
wider gaps, linear as for float). The product rule holds for int8 as well as for float (a few %
mean error, the smallest corners underestimated).

Predictions are vectorised (`ChannelGraph.widths`, `_flat_curves`): the latency-aware exchange
asks for ~10^5 of them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from pocketflow.io import atomic_write_text
from pocketflow.learners.channel_pruning.counts import allowed_counts
from pocketflow.learners.channel_pruning.graph import ChannelGraph
from pocketflow.learners.channel_pruning.latency_measure import (DEPLOYS, _deploy, _machine,  # noqa: F401
                                                                 calibration_images, convert, default_cache,
                                                                 measure_layer, pruned_ms)
from pocketflow.learners.topology import PRODUCER, SEPARABLE


def _anchor(c: int) -> bool:
    """Counts above 128 measured (on any grid): multiples of 64 to 256, of 128 to 512, of 256
    above. The same for every layer, so equal layer shapes of different widths share entries;
    between them the table interpolates (on tile multiples XNNPACK's cost is close to linear)."""
    return c <= 128 or c % (64 if c <= 256 else 128 if c <= 512 else 256) == 0


def _thin(counts, keep_every: int = 4) -> list[int]:
    """Counts to measure: every `keep_every`-th count to 16, the tile steps to 128, then the
    `_anchor` counts above 128, both ends."""
    counts = sorted(set(int(c) for c in counts))
    if len(counts) <= 6:
        return counts
    small = [c for c in counts if c <= 16 and c % keep_every == 0]
    big = [c for c in counts if c > 16 and _anchor(c)]
    return sorted(set(small + big + [counts[0], counts[-1]]))


def side_counts(g: ChannelGraph, m: int, t: int, lo: float):
    """layout -> the kept-position counts a layer's input or output can take with channel
    multiple `m`, tile `t` and ratio floor `lo` (what the table measures). A layout of several
    groups (a concatenation) can keep any sum: it is measured at the tile multiples from the
    floor (shared by every layer reading a concatenation of that shape, e.g. DenseNet's)."""
    def side(lay):
        ids = [int(i) for i in np.unique(lay.group)]
        movable = [i for i in ids if i >= 0 and g.groups[i].prunable]
        if not movable:
            return [len(lay)]
        if len(ids) == 1:
            gr, rep = g.groups[ids[0]], len(lay) // g.groups[ids[0]].size
            ok = allowed_counts(gr.size, m, t)
            return [int(rep * c) for c in ok if c >= min(ok[-1], lo * gr.size - 1e-9)]
        fixed = sum(n for i, n in lay.positions.items() if i not in movable)
        step = max(t, m, 1)
        floor = fixed + sum(lo * n for i, n in lay.positions.items() if i in movable)
        if step > 1:
            grid = [c for c in range(step, len(lay), step) if c >= floor - step]
            return sorted(set(grid) | {len(lay)})
        return sorted({int(round(len(lay) * f)) for f in np.linspace(lo, 1.0, 9)} | {len(lay)})
    return side


def _step_up(x, xp, fp, tile: int = 4) -> np.ndarray:
    """int8 interpolation: between measured counts at most `tile` apart, the value at the next
    measured count up; across wider gaps, linear (as for float). XNNPACK's int8 kernels pad both
    channel counts to a tile (8 on AVX2, docs/benchmarks/int8_latency.md), so 9-11 channels cost
    as much as 12 or 16, where linear interpolation from 8 says up to a third less; measured every
    4th count, a staircase of any tile that is a multiple of 4 is read exactly. A wider gap (16 to
    32 on the tile-32 grid) does not resolve the steps inside it: linear is the better guess."""
    x, xp, fp = np.asarray(x), np.asarray(xp), np.asarray(fp, dtype=float)
    out = np.interp(x, xp, fp)
    j = np.clip(np.searchsorted(xp, x, side="left"), 1, len(xp) - 1)
    dense = (x > xp[0]) & (x < xp[-1]) & (xp[j] - xp[j - 1] <= tile)
    out[dense] = fp[j[dense]]
    return out


class LatencyTable:
    """Measured per-layer latencies of one model's producers, and predictions from them."""

    def __init__(self, model, graph: ChannelGraph, side_counts, settings=((1, 1), (32, 1)),
                 cache: Path | str | None = None, invokes: int = 12, measure=None, deploy: str = "float"):
        """`side_counts(layout)` -> the channel counts of a layer's input or output to measure
        (kept positions of that layout, ascending, ending with the full width).

        `measure(spec, c_in, c_out)` -> {"b<batch>_t<threads>": ms} replaces the timing with given
        numbers (tests, tables measured elsewhere); such a table neither reads nor writes the
        disk cache.

        `deploy`: the TFLite file each layer is timed as, "float" or "int8" (see `convert`)."""
        self.deploy = _deploy(deploy)
        self.graph, self.settings = graph, [tuple(int(v) for v in s) for s in settings]
        self.invokes, self._given = invokes, measure
        self.cache = Path(cache) if cache else default_cache()
        # name -> {"cls", "cfg", "spatial", "in", "out", "full_in", "full_out", "ref_in"}
        self.layers: dict[str, dict] = {}
        for name in graph.order:
            if graph.kinds[name] not in (PRODUCER, SEPARABLE):
                continue
            layer = model.get_layer(name)
            if type(layer).__name__ not in ("Conv2D", "Dense", "SeparableConv2D"):
                continue
            lin, lout = graph.lay_in.get(name), graph.lay_out.get(name)
            if lin is None or lout is None:
                continue
            cfg = {k: v for k, v in layer.get_config().items()
                   if k in ("kernel_size", "strides", "padding", "dilation_rate", "depth_multiplier", "use_bias")
                   or k == "groups" and v != 1}  # (groups=1 left out: cached keys stay valid)
            spatial = tuple(int(d) for d in layer.input.shape[1:-1])
            ins = _thin(side_counts(lin))
            self.layers[name] = {"cls": type(layer).__name__, "cfg": cfg, "spatial": spatial,
                                 "full_in": len(lin), "full_out": len(lout), "in": ins,
                                 "out": _thin(side_counts(lout)), "ref_in": _ref_in(lin, ins)}
        self._t: dict[str, dict] = {}  # key -> {setting: ms}
        self._memo: dict = {}
        self._curve: dict = {}
        self._flat: list = []
        self._full: list = []
        self._fill()

    # -- measurement --------------------------------------------------------------------------------
    def _key(self, spec: dict, cin: int, cout: int) -> str:
        sig = [spec["cls"], spec["cfg"], spec["spatial"], cin, cout]
        if self.deploy != "float":  # float keys keep their first format (existing caches stay valid)
            sig.append(self.deploy)
        return json.dumps(sig, sort_keys=True)

    def _pairs(self, spec: dict) -> list[tuple[int, int]]:
        """The (c_in, c_out) a layer's curves read: outputs at `ref_in` inputs, inputs at all outputs."""
        return [(spec["ref_in"], c) for c in spec["out"]] + [(c, spec["full_out"]) for c in spec["in"]]

    def _wanted(self) -> list[tuple[str, dict, int, int]]:
        """Every entry the layers need, each key once (equal layer shapes share their entries)."""
        out = {}
        for spec in self.layers.values():
            for cin, cout in self._pairs(spec):
                out.setdefault(self._key(spec, cin, cout), (spec, cin, cout))
        return [(k, *v) for k, v in out.items()]

    def _fill(self) -> None:
        from pocketflow.distributed import world
        w = world()
        table = None
        if self._given is not None:
            table = {k: dict(self._given(spec, cin, cout)) for k, spec, cin, cout in self._wanted()}
        elif w.is_root:
            disk, machine = {}, _machine()
            try:
                disk = json.loads(self.cache.read_text())
            except (OSError, ValueError):
                pass
            mine = disk.setdefault(machine, {})
            names = [f"b{b}_t{t}" for b, t in self.settings]
            todo = [(k, s, i, o) for k, s, i, o in self._wanted() if any(n not in mine.get(k, {}) for n in names)]
            if todo:
                self._measure_all(todo, mine)
                try:  # workers measuring at once: each write is whole (the last one wins)
                    atomic_write_text(self.cache, json.dumps(disk))
                except OSError:
                    pass
            table = {k: mine[k] for k, *_ in self._wanted() if k in mine}
        self._t = w.broadcast_object(table) if w.distributed and self._given is None else table
        for name, spec in list(self.layers.items()):  # drop layers with a missing measurement
            if any(self._key(spec, i, o) not in self._t for i, o in self._pairs(spec)):
                del self.layers[name]

    def _measure_all(self, todo: list, mine: dict) -> None:
        """Measure `todo` into `mine`, saying what it does: a tqdm bar on a terminal, else a line
        every 25 shapes (the first use of a big model takes a minute)."""
        t0, n = time.perf_counter(), len(todo)
        print(f"channel_pruning: measuring {n} layer shapes (TFLite, {self.deploy}) for the latency table "
              f"({len(self.layers)} layers; cached in {self.cache})", flush=True)
        bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm
            bar = tqdm(total=n, desc="latency table", unit="shape", leave=False)
        for i, (k, spec, cin, cout) in enumerate(todo, 1):
            try:
                mine[k] = {**mine.get(k, {}), **self._measure(spec, cin, cout)}
            except Exception:  # noqa: BLE001  a layer TFLite cannot take on its own: left out below
                pass
            if bar is not None:
                bar.update()
            elif i % 25 == 0 and i < n:
                print(f"channel_pruning: latency table {i}/{n} shapes, {time.perf_counter() - t0:.0f}s", flush=True)
        if bar is not None:
            bar.close()
        print(f"channel_pruning: measured {n} layer shapes for the {self.deploy} latency table in "
              f"{time.perf_counter() - t0:.0f}s ({self.cache})", flush=True)

    def _measure(self, spec: dict, cin: int, cout: int) -> dict:
        return measure_layer(spec, cin, cout, self.settings, self.invokes, self.deploy)

    # -- prediction ---------------------------------------------------------------------------------
    def _curves(self, name: str, setting: tuple):
        """(t_out over 0..C_out, t_in over 0..C_in relative to full width, t at full width),
        interpolated once. Outputs measured at `ref_in` < C_in inputs are scaled to C_in by the
        product rule itself: t(C_in, c) = t(ref_in, c) * t(C_in, C_out) / t(ref_in, C_out)."""
        key = (name, setting)
        hit = self._curve.get(key)
        if hit is None:
            spec, s = self.layers[name], f"b{setting[0]}_t{setting[1]}"
            fi, fo, ref = spec["full_in"], spec["full_out"], spec["ref_in"]
            full = max(self._t[self._key(spec, fi, fo)][s], 1e-9)
            scale = full / max(self._t[self._key(spec, ref, fo)][s], 1e-9) if ref != fi else 1.0
            fill = np.interp if self.deploy == "float" else _step_up
            t_out = fill(np.arange(fo + 1), spec["out"], [self._t[self._key(spec, ref, c)][s] for c in spec["out"]])
            t_in = fill(np.arange(fi + 1), spec["in"], [self._t[self._key(spec, c, fo)][s] for c in spec["in"]])
            hit = self._curve[key] = (t_out * scale, t_in / full, full)
        return hit

    def layer_ms(self, name: str, cin: int, cout: int, setting: tuple) -> float:
        t_out, t_in, _ = self._curves(name, setting)
        return float(t_out[cout] * t_in[cin])

    def _flat_curves(self):
        """Per setting: every layer's curves end to end, with each layer's offsets, so a model's
        prediction is two gathers and a dot product."""
        if not self._flat:
            names = list(self.layers)
            for s in self.settings:
                outs, ins = zip(*[self._curves(n, s)[:2] for n in names]) if names else ((), ())
                o_off = np.cumsum([0, *[len(c) for c in outs]])[:-1].astype(np.int64)
                i_off = np.cumsum([0, *[len(c) for c in ins]])[:-1].astype(np.int64)
                self._flat.append((np.concatenate(outs or [np.zeros(0)]), o_off,
                                   np.concatenate(ins or [np.zeros(0)]), i_off))
        return self._flat

    def model_ms(self, counts: dict, setting: tuple) -> float:
        """Predicted latency (ms, producers only) with `counts[group]` channels kept."""
        return self._model_ms(counts)[self.settings.index(tuple(setting))]

    def _model_ms(self, counts: dict) -> list[float]:
        kin, kout = self.graph.widths(counts, tuple(self.layers))
        return [float(np.dot(to[oo + kout], ti[io + kin])) for to, oo, ti, io in self._flat_curves()]

    def cost(self, counts: dict) -> float:
        """Mean over the settings of the predicted latency relative to the unpruned model."""
        key = tuple(counts.items())  # (an equal dict in another order only misses the memo)
        hit = self._memo.get(key)
        if hit is None:
            if not self._full:
                self._full = [max(v, 1e-9) for v in self._model_ms({})]
            hit = self._memo[key] = float(np.mean([v / f for v, f in zip(self._model_ms(counts), self._full)]))
        return hit


def _ref_in(lay, ins: list) -> int:
    """The input width a layer's output curve is measured at: its own, except for a reader of a
    concatenation (several groups, DenseNet), whose width is rarely another layer's: there the
    largest measured multiple of 128 below it, shared by the layers around it."""
    full = len(lay)
    if len(lay.positions) < 2 or full % 128 == 0:
        return full
    return max((c for c in ins if c % 128 == 0 and c < full), default=full)
