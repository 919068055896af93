"""Target metrics: what each ratio is a ratio of, and on which file.

A user reads a ratio as a statement about the file they ship, so the three file metrics are
measured on it: the deployable TFLite file `best/` ships (`model_int8.tflite` when the run
quantizes to int8, else `model.tflite`) against the baseline model's float TFLite file:

    size           raw bytes
    download_size  gzip'd bytes (level 9, what a download or an app store compresses to)
    latency        median invoke time with the TFLite interpreter on this machine
                   (`target.batch`, `target.threads`)

The counting metrics compare the Keras models: `flops` (multiply-accumulates), `params`
(nonzero parameters). `packed_size` is float32 weight bytes over `weights_packed.bin`, the
learners' exact packed representation (sub-byte codes, sparse layouts) that no interpreter runs:
useful to compare methods, never a download size. `compression`, its old name, is an alias.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pocketflow.errors import PocketFlowError

#: metric -> what its ratio compares (printed next to every ratio, stored in metrics.json)
METRICS = {
    "size": "bytes of {file} / the float baseline's model.tflite",
    "download_size": "gzip'd bytes of {file} / the float baseline's model.tflite gzip'd",
    "latency": "median invoke time of {file} / the float baseline's model.tflite (batch {batch}, {threads} thread(s))",
    "flops": "MACs of the deploy model / the baseline's",
    "params": "nonzero parameters of the deploy model / the baseline's",
    "packed_size": "float32 weight bytes of the baseline / weights_packed.bin + float32 rest",
}
ALIASES = {"compression": "packed_size"}
TOLERANCE = 0.01  # a measured ratio 1% under the target still meets it (search trials and the final model)
SIZE_METRICS = ("size", "download_size")
FILE_METRICS = SIZE_METRICS + ("latency",)


def canonical(metric: str) -> tuple[str, str | None]:
    """(the metric's name, a one-line notice if `metric` is an alias)."""
    if metric in ALIASES:
        name = ALIASES[metric]
        return name, (f"target metric '{metric}' is '{name}' (weights_packed.bin, which no interpreter runs); "
                      "the shipped TFLite file's ratios are 'size' and 'download_size'")
    return metric, None


@dataclass
class Shipped:
    """The file a run ships and the baseline file its ratios are against.

    deploy          'float' or 'int8' (the TFLite conversion `best/` gets)
    representative  images for int8 calibration (the same the export uses)
    baseline        the original (trained) Keras model; its float TFLite is converted once
    """
    deploy: str
    representative: np.ndarray | None
    batch: int = 1
    threads: int = 1
    weight_scales: str = "auto"
    sparse_encoding: str = "off"  # export.sparse_encoding: the shipped file may hold sparse tensors
    #: set by `export.quantize`: a learner may not pick another deploy type per method
    fixed: bool = False
    #: baseline files, their values and the size model, shared by `with_deploy` copies
    _base: dict = field(default_factory=dict, repr=False)

    @classmethod
    def for_run(cls, export: dict, target: dict, learner_quantize: str | None, data) -> "Shipped":
        """What a run with these `export:` and `target:` sections ships (`export.quantize`, else
        the learner's own deploy type, else float)."""
        return cls(deploy=export["quantize"] or learner_quantize or "float",
                   representative=data.representative() if data is not None else None,
                   batch=int(target.get("batch", 1)), threads=int(target.get("threads", 1)),
                   weight_scales=export.get("weight_scales", "auto"),
                   sparse_encoding=export.get("sparse_encoding", "off"), fixed=export["quantize"] is not None)

    def with_deploy(self, deploy: str | None) -> "Shipped":
        """The same run shipping another file type (a method search mixes float and int8 methods);
        the baseline's files, values and size model are shared, not measured again. `export.quantize`
        wins over any learner's choice."""
        deploy = deploy or "float"
        if self.fixed or deploy == self.deploy:
            return self
        return replace(self, deploy=deploy, _base=self._base)

    @property
    def file(self) -> str:
        """The shipped file's name in best/ (as pocketflow.export.export_model names it)."""
        return "model.tflite" if self.deploy == "float" else f"model_{self.deploy}.tflite"

    @property
    def export_key(self) -> str:
        """Its entry in metrics.json's `exports`."""
        return "tflite" if self.deploy == "float" else f"tflite_{self.deploy}"

    def describe(self, metric: str) -> str:
        return METRICS[metric].format(file=self.file, batch=self.batch, threads=self.threads)

    # -- files ----------------------------------------------------------------------------------
    def convert(self, keras_model) -> bytes:
        """The file `best/` would ship for `keras_model` (the export's conversion)."""
        from pocketflow.export.tflite import to_tflite
        return to_tflite(keras_model, None if self.deploy == "float" else self.deploy, self.representative,
                         weight_scales=self.weight_scales, sparse_encoding=self.sparse_encoding)

    def value(self, blob: bytes, metric: str, input_shape: tuple) -> float:
        """Bytes, gzip'd bytes or milliseconds of one TFLite file."""
        from pocketflow import metrics as M
        if metric == "size":
            return float(len(blob))
        if metric == "download_size":
            return float(M.gzip_size(blob))
        if metric == "latency":
            try:
                return M.tflite_latency(blob, input_shape, batch=self.batch, threads=self.threads)
            except (RuntimeError, ValueError) as e:  # e.g. a diverged model's inf quantization scales
                raise PocketFlowError(f"{self.file} does not run in the TFLite interpreter: "
                                      + str(e).splitlines()[0][:300]) from None
        raise PocketFlowError(f"'{metric}' is not measured on a file")

    def baseline_value(self, original, metric: str) -> float:
        """The float baseline file's value (converted and measured once per model)."""
        return self._cached(original, (metric,), lambda: self.value(self._baseline_blob(original), metric,
                                                                  tuple(original.input_shape[1:])))

    def _cached(self, original, key, make):
        """`make()` computed once per baseline model (the cache holds the model to tell a new one
        that reuses a freed id)."""
        hit = self._base.get((id(original),) + key)
        if hit is None or hit[0] is not original:
            hit = self._base[(id(original),) + key] = (original, make())
        return hit[1]

    def _baseline_blob(self, original) -> bytes:
        from pocketflow.export.tflite import to_tflite
        return self._cached(original, ("blob",), lambda: to_tflite(original))

    def same_graph_ratio(self, original, metric: str) -> float:
        """The ratio of `original` itself shipped as this file type: what a learner that keeps the
        graph (sparsity, clustering, quantization) gets on `latency` (int8 kernels may run faster,
        or slower, than float ones on this CPU: measured, never assumed)."""
        if self.deploy == "float":
            return 1.0  # the baseline file itself
        return self._cached(original, ("same_graph", metric, self.deploy),
                            lambda: self.measure(original, original, metric))

    def ratio(self, original, blob: bytes, metric: str) -> float:
        """The measured ratio of a shipped file `blob` against the baseline's float file."""
        return self.entry(blob, metric, tuple(original.input_shape[1:]), self.baseline_value(original, metric))["ratio"]

    def entry(self, blob: bytes, metric: str, input_shape: tuple, baseline: float) -> dict:
        """metrics.json's record of one file metric: `blob`'s value, the baseline's, their ratio."""
        value = self.value(blob, metric, input_shape)
        return {"ratio": baseline / max(value, 1e-12), "file": self.file, "value": value, "baseline_value": baseline,
                "unit": "ms" if metric == "latency" else "bytes", "of": self.describe(metric)}

    def measure(self, original, deploy_model, metric: str) -> float:
        return self.ratio(original, self.convert(deploy_model), metric)

    # -- predictions ----------------------------------------------------------------------------
    def size_model(self, original):
        """The TFLite size model of `original` (calibrated once: one float and one int8 conversion)."""
        from pocketflow.export.size_model import TFLiteSizeModel
        if self.representative is None:
            raise PocketFlowError("a size target needs representative images to calibrate its size model")
        return self._cached(original, ("size_model",), lambda: TFLiteSizeModel.calibrate(
            original, self.representative, float_blob=self._baseline_blob(original)))

    def predict(self, original, reps: dict, metric: str, pattern: str = "unstructured") -> float:
        """Predicted `size` / `download_size` ratio of the file whose kernels are stored as `reps`
        (learners.accounting.KernelRep), before any training or conversion."""
        if metric not in SIZE_METRICS:
            raise PocketFlowError(f"'{metric}' is not predicted from kernel representations")
        if self.deploy not in ("float", "int8"):
            raise PocketFlowError(f"a {metric} target is predicted for float and int8 TFLite files, not "
                                  f"export.quantize: {self.deploy}")
        return self.size_model(original).ratio(reps, metric, deploy=self.deploy, pattern=pattern,
                                               weight_scales=_scales(self.weight_scales))


def _scales(weight_scales: str) -> str:
    """The size model's int8 layout for an export setting ('auto' exports per channel unless every
    kernel sits on one per-tensor grid, which only trained codebooks do: per channel is the
    prediction before training)."""
    return "per_channel" if weight_scales == "auto" else weight_scales


def measure_all(shipped: Shipped, original, blob: bytes, learner, compressed, packed_file: str | None) -> dict:
    """Every metric's measured ratio for metrics.json, each naming the file (or model) it is about:
    the file metrics on `blob` (the shipped file as written), the others from the learner."""
    shape = tuple(original.input_shape[1:])
    out = {}
    for m in FILE_METRICS:
        out[m] = shipped.entry(blob, m, shape, shipped.baseline_value(original, m))
    for m in ("flops", "params", "packed_size"):
        out[m] = {"ratio": float(learner.measure(original, compressed, m)), "of": METRICS[m]}
        if m == "packed_size":
            out[m]["file"] = packed_file or "(none: the deploy model's float32 weights)"
    return out


def shipped_record(shipped: Shipped, original, learner, compressed, out_dir, exports: dict) -> dict:
    """metrics.json's `measured` (every metric's ratio naming its file), `ratios` (the same, flat)
    and `shipped` (the file the targets are about), read off the files just written to `out_dir`."""
    from pathlib import Path
    entry = exports.get(shipped.export_key)
    blob = (Path(out_dir) / shipped.file).read_bytes() if entry else shipped.convert(compressed.deploy)
    packed = Path(exports["packed"]["path"]).name if "packed" in exports else None
    measured = measure_all(shipped, original, blob, learner, compressed, packed)
    return {"measured": measured, "ratios": {m: r["ratio"] for m, r in measured.items()},
            "shipped": {"file": shipped.file, "deploy": shipped.deploy, "bytes": len(blob),
                        "exported": entry is not None, "test_accuracy": (entry or {}).get("test_accuracy")}}


def ratio_line(measured: dict) -> str:
    """`size 3.51x, download_size 13.30x, latency 1.20x (model_int8.tflite); flops 1.00x, params
    3.23x; packed_size 16.54x (weights_packed.bin)`: every ratio with the file it is about."""
    groups: dict = {}
    for m, r in measured.items():
        groups.setdefault(r.get("file", ""), []).append(f"{m} {r['ratio']:.2f}x")
    return "; ".join(", ".join(v) + (f" ({k})" if k else "") for k, v in groups.items())


def remeasure(metrics: dict, blob: bytes, input_shape: tuple) -> None:
    """After `pocketflow export` rewrote the shipped file in best/: its file metrics measured again
    (against the baseline values metrics.json already holds), so metrics.json describes the file
    on disk."""
    t = metrics.get("target") or {}
    s = Shipped(deploy=metrics["shipped"]["deploy"], representative=None, batch=int(t.get("batch", 1)),
                threads=int(t.get("threads", 1)))
    for m in FILE_METRICS:
        r = metrics.get("measured", {}).get(m)
        if r is not None:
            r.update(s.entry(blob, m, input_shape, r["baseline_value"]))
            metrics["ratios"][m] = r["ratio"]
    metrics["shipped"]["bytes"] = len(blob)


def meet_target(target: dict, learner, original, data, params: dict, compressed, budget, log=print):
    """(params, compressed) whose shipped file meets `target`. The full fine-tune runs longer than
    a trial and can leave a file a little larger than the trial's (trained weights gzip worse):
    then the point is projected once more, onto the target scaled by the miss, and compressed
    again (the final fine-tune runs twice in that case, and `log` says so)."""
    from pocketflow.distributed import world
    metric, ratio = target["metric"], target["ratio"]
    if ratio is None:
        return params, compressed
    got = world().broadcast_object(float(learner.measure(original, compressed, metric)) if world().is_root else None)
    if got >= ratio * (1 - TOLERANCE):
        return params, compressed
    predicted = learner.predict_ratio(original, params, metric)
    aim = predicted * ratio / got * (1 + TOLERANCE / 2)
    log(f"final: {metric} {got:.2f}x misses the target {ratio:g}x after the full fine-tune (predicted "
        f"{predicted:.2f}x); compressing again at a predicted {aim:.2f}x")
    params = learner.project(original, params, metric, aim)
    return params, learner.compress(original, params, data, budget)
