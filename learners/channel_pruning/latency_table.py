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

Timings are the fastest of a few invokes (other jobs on a shared machine can only slow an
invoke down) and are cached in a JSON file keyed by machine, TensorFlow version and layer
signature, so a model's table is measured once per machine (about a minute for ResNet-20).

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

`pruned_ms` is the other measurement channel pruning makes: a whole pruned model's latency,
for the `latency` target.
"""
from __future__ import annotations

import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.io import atomic_write_text
from pocketflow.learners.channel_pruning.counts import allowed_counts
from pocketflow.learners.channel_pruning.graph import ChannelGraph
from pocketflow.learners.topology import PRODUCER, SEPARABLE


def default_cache() -> Path:
    root = os.environ.get("POCKETFLOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pocketflow")
    return Path(root) / "latency_table.json"


def _machine() -> str:
    import tensorflow as tf
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} | {os.cpu_count()} cpus | tf {tf.__version__}"


def _thin(counts, keep_every: int = 4) -> list[int]:
    """Counts to measure: every `keep_every`-th small count, all the rest (tile steps), both ends."""
    counts = sorted(set(int(c) for c in counts))
    if len(counts) <= 6:
        return counts
    small = [c for c in counts if c % keep_every == 0 or c == counts[0]]
    big = [c for c in counts if c > 16]
    return sorted(set(small + big + [counts[0], counts[-1]]))


def side_counts(g: ChannelGraph, m: int, t: int, lo: float):
    """layout -> the kept-position counts a layer's input or output can take with channel
    multiple `m`, tile `t` and ratio floor `lo` (what the table measures)."""
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


DEPLOYS = ("float", "int8")


def _deploy(deploy: str) -> str:
    if deploy not in DEPLOYS:
        raise PocketFlowError(f"unknown deploy '{deploy}': choose {' or '.join(DEPLOYS)}")
    return deploy


def calibration_images(input_shape, n: int = 16, seed: int = 0) -> np.ndarray:
    """`n` float32 inputs of `input_shape` (no batch dimension), uniform in [0, 1]: what int8
    timing calibrates with (the scales it picks do not change the kernels' cost)."""
    return np.random.default_rng(seed).random((n, *input_shape), dtype=np.float32)


def convert(model, deploy: str = "float", representative: np.ndarray | None = None) -> bytes:
    """`model`'s TFLite file as `deploy` ships it (int8: full-integer, per-channel weight scales,
    calibrated on `representative` or on `calibration_images`)."""
    from pocketflow.export import to_tflite
    if _deploy(deploy) == "float":
        return to_tflite(model)
    if representative is None:
        representative = calibration_images(tuple(model.input_shape[1:]))
    with warnings.catch_warnings():  # int8 inputs: said once per conversion, hundreds per table
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return to_tflite(model, "int8", representative, weight_scales="per_channel")


def pruned_ms(model, g: ChannelGraph, counts: dict, deploy: str = "float",
              representative: np.ndarray | None = None) -> float:
    """TFLite latency (batch 1, 1 thread) of `model` pruned to `counts` (first channels kept),
    converted as `deploy` ("float" or "int8", see `convert`): the fastest of 60 invokes after 5
    warm-up ones, which other jobs on a shared machine can only slow down (a median moves with
    their load)."""
    from pocketflow import metrics as M
    _deploy(deploy)
    pruned = g.prune(model, {gid: np.arange(k) for gid, k in counts.items()})
    run = M.TFLiteRunner(convert(pruned, deploy, representative), threads=1, batch=1)
    x = np.random.default_rng(0).random((1, *model.input_shape[1:]), dtype=np.float32)
    return float(M.invoke_ms(run, x, 60, warmup=5).min())


def _invoke_only_ms(runner, x: np.ndarray, runs: int, warmup: int = 0) -> np.ndarray:
    """Wall time of each of `runs` bare `invoke`s (ms), the input set once. An int8 layer's input
    and output stay int8 inside a deployed model: the runner's numpy (de)quantization of a whole
    feature map (23-60 us a layer of ResNet-20 on the AMD EPYC of docs/benchmarks/int8_latency.md,
    as much as the convolution itself) is no part of its cost."""
    runner(x)
    for _ in range(warmup):
        runner.interp.invoke()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        runner.interp.invoke()
        times[i] = (time.perf_counter() - t0) * 1e3
    return times


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
        self.layers: dict[str, dict] = {}  # name -> {"sig", "in": [...], "out": [...], "full_in", "full_out"}
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
            self.layers[name] = {"cls": type(layer).__name__, "cfg": cfg, "spatial": spatial,
                                 "full_in": len(lin), "full_out": len(lout),
                                 "in": _thin(side_counts(lin)), "out": _thin(side_counts(lout))}
        self._t: dict[str, dict] = {}  # key -> {setting: ms}
        self._memo: dict = {}
        self._curve: dict = {}
        self._full: list = []
        self._fill()

    # -- measurement --------------------------------------------------------------------------------
    def _key(self, spec: dict, cin: int, cout: int) -> str:
        sig = [spec["cls"], spec["cfg"], spec["spatial"], cin, cout]
        if self.deploy != "float":  # float keys keep their first format (existing caches stay valid)
            sig.append(self.deploy)
        return json.dumps(sig, sort_keys=True)

    def _wanted(self) -> list[tuple[str, dict, int, int]]:
        out = []
        for spec in self.layers.values():
            for c in spec["out"]:
                out.append((self._key(spec, spec["full_in"], c), spec, spec["full_in"], c))
            for c in spec["in"]:
                out.append((self._key(spec, c, spec["full_out"]), spec, c, spec["full_out"]))
        return list({k: (k, s, i, o) for k, s, i, o in out}.values())

    def _fill(self) -> None:
        from pocketflow.distributed import world
        w = world()
        table = None
        if self._given is not None:
            table = {k: dict(self._given(spec, cin, cout)) for k, spec, cin, cout in self._wanted()}
        elif w.is_root:
            machine = _machine()
            disk = {}
            try:
                disk = json.loads(self.cache.read_text())
            except (OSError, ValueError):
                pass
            mine = disk.setdefault(machine, {})
            names = [f"b{b}_t{t}" for b, t in self.settings]
            todo = [(k, s, i, o) for k, s, i, o in self._wanted() if any(n not in mine.get(k, {}) for n in names)]
            if todo:
                t0 = time.perf_counter()
                for k, spec, cin, cout in todo:
                    try:
                        mine[k] = {**mine.get(k, {}), **self._measure(spec, cin, cout)}
                    except Exception:  # noqa: BLE001  a layer TFLite cannot take on its own: left out below
                        continue
                print(f"channel_pruning: measured {len(todo)} layer shapes for the {self.deploy} latency table in "
                      f"{time.perf_counter() - t0:.0f}s ({self.cache})", flush=True)
                try:  # workers measuring at once: each write is whole (the last one wins)
                    atomic_write_text(self.cache, json.dumps(disk))
                except OSError:
                    pass
            table = {k: mine[k] for k, *_ in self._wanted() if k in mine}
        self._t = w.broadcast_object(table) if w.distributed and self._given is None else table
        for name, spec in list(self.layers.items()):  # drop layers with a missing measurement
            if any(self._key(spec, spec["full_in"], c) not in self._t for c in spec["out"]) or any(
                    self._key(spec, c, spec["full_out"]) not in self._t for c in spec["in"]):
                del self.layers[name]

    def _measure(self, spec: dict, cin: int, cout: int) -> dict:
        import keras

        from pocketflow import metrics as M
        L = keras.layers
        cfg = dict(spec["cfg"])
        if spec["cls"] == "Dense":
            inp = keras.Input((cin,))
            layer = L.Dense(cout, use_bias=cfg.get("use_bias", True))
        else:
            inp = keras.Input((*spec["spatial"], cin))
            layer = getattr(L, spec["cls"])(cout, **cfg)
        blob = convert(keras.Model(inp, layer(inp)), self.deploy)
        out = {}
        for batch, threads in self.settings:
            run = M.TFLiteRunner(blob, threads=threads, batch=batch)
            x = np.random.default_rng(0).random((batch, *inp.shape[1:]), dtype=np.float32)
            n = self.invokes if batch == 1 else max(3, self.invokes // 3)
            if self.deploy == "float":
                out[f"b{batch}_t{threads}"] = float(M.invoke_ms(run, x, n, warmup=1).min())
            else:
                out[f"b{batch}_t{threads}"] = float(_invoke_only_ms(run, x, n, warmup=1).min())
        return out

    # -- prediction ---------------------------------------------------------------------------------
    def _curves(self, name: str, setting: tuple):
        """(t_out over 0..C_out, t_in over 0..C_in, t at full width), interpolated once."""
        key = (name, setting)
        hit = self._curve.get(key)
        if hit is None:
            spec, s = self.layers[name], f"b{setting[0]}_t{setting[1]}"
            fi, fo = spec["full_in"], spec["full_out"]
            full = max(self._t[self._key(spec, fi, fo)][s], 1e-9)
            fill = np.interp if self.deploy == "float" else _step_up
            t_out = fill(np.arange(fo + 1), spec["out"], [self._t[self._key(spec, fi, c)][s] for c in spec["out"]])
            t_in = fill(np.arange(fi + 1), spec["in"], [self._t[self._key(spec, c, fo)][s] for c in spec["in"]])
            hit = self._curve[key] = (t_out, t_in / full, full)
        return hit

    def layer_ms(self, name: str, cin: int, cout: int, setting: tuple) -> float:
        t_out, t_in, _ = self._curves(name, setting)
        return float(t_out[cout] * t_in[cin])

    def _widths(self, counts: dict) -> list[tuple[str, int, int]]:
        g = self.graph
        return [(name, g._kept(g.lay_in[name], counts)[0], g._kept(g.lay_out[name], counts)[0]) for name in self.layers]

    def model_ms(self, counts: dict, setting: tuple, widths=None) -> float:
        """Predicted latency (ms, producers only) with `counts[group]` channels kept."""
        return sum(self.layer_ms(n, i, o, setting) for n, i, o in (widths or self._widths(counts)))

    def cost(self, counts: dict) -> float:
        """Mean over the settings of the predicted latency relative to the unpruned model."""
        key = tuple(sorted(counts.items()))
        hit = self._memo.get(key)
        if hit is None:
            if not self._full:
                self._full = [max(self.model_ms({}, s), 1e-9) for s in self.settings]
            widths = self._widths(counts)
            hit = self._memo[key] = float(np.mean([self.model_ms(counts, s, widths) / f
                                                   for s, f in zip(self.settings, self._full)]))
        return hit
