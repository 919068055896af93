"""How channel pruning times TFLite files: one layer shape of the latency table
(`measure_layer`), or a whole pruned model for the `latency` target (`pruned_ms`), converted
as the run ships ("float" or full-integer "int8", `convert`); where the table is cached
(`default_cache`, keyed by `_machine`)."""
from __future__ import annotations

import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.learners.channel_pruning.graph import ChannelGraph


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


def measure_layer(spec: dict, cin: int, cout: int, settings, invokes: int, deploy: str) -> dict:
    """{"b<batch>_t<threads>": ms} of one layer like `spec` ({"cls", "cfg", "spatial"}) with
    `cin` inputs and `cout` outputs, alone in a TFLite file: the fastest of `invokes` (a third
    of them at batch > 1) after one warm-up."""
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
    blob = convert(keras.Model(inp, layer(inp)), deploy)
    out = {}
    for batch, threads in settings:
        run = M.TFLiteRunner(blob, threads=threads, batch=batch)
        x = np.random.default_rng(0).random((batch, *inp.shape[1:]), dtype=np.float32)
        n = invokes if batch == 1 else max(3, invokes // 3)
        timer = M.invoke_ms if deploy == "float" else _invoke_only_ms
        out[f"b{batch}_t{threads}"] = float(timer(run, x, n, warmup=1).min())
    return out
