"""Float vs int8 TFLite latency of ResNet-20 on this machine, and how well the int8 per-layer latency
table (learners/channel_pruning/latency_table.py, deploy="int8") predicts pruned models.

    python scripts/benchmarks/int8_latency.py [--rounds 15] [--invokes 50] [--skip whole staircase product table]

Prints the numbers docs/benchmarks/int8_latency.md reports (written by hand from this output).
The machine may be shared: every timing is interleaved over rounds (each model takes its turn in
every round), and the load average is printed next to each section.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_name, load_avg  # noqa: E402

MODEL = ROOT.parent / "shared" / "models" / "resnet20_fashion_mnist.keras"


def flags() -> str:
    have = set(Path("/proc/cpuinfo").read_text().split())
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in have) or "none"


def model():
    import keras
    if MODEL.exists():
        return keras.saving.load_model(MODEL), MODEL.name
    from pocketflow.zoo import build_model
    keras.utils.set_random_seed(0)
    return build_model("resnet20", (28, 28, 1), 10), "zoo resnet20 (random weights)"


def interleaved(runners: dict, x: np.ndarray, rounds: int, invokes: int, bare: bool = False) -> dict:
    """name -> (fastest invoke, best round's median) in us; `bare`: interp.invoke() only."""
    from pocketflow import metrics as M
    from pocketflow.learners.channel_pruning.latency_table import _invoke_only_ms
    best = {k: (np.inf, np.inf) for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            t = (_invoke_only_ms(r, x, invokes, 10) if bare else M.invoke_ms(r, x, invokes, warmup=10)) * 1e3
            best[k] = (min(best[k][0], t.min()), min(best[k][1], float(np.median(t))))
    return best


def whole_model(m, rounds: int, invokes: int) -> None:
    from pocketflow import metrics as M
    from pocketflow.learners.channel_pruning.latency_table import convert
    blobs = {"float": convert(m), "int8": convert(m, "int8")}
    x = np.random.default_rng(0).random((1, *m.input_shape[1:]), dtype=np.float32)
    print(f"\n## whole model, batch 1 (load {load_avg()})")
    print("| threads | timing | float fastest / median us | int8 fastest / median us | int8 speedup (fastest / median) |")
    print("|---|---|---|---|---|")
    for threads in (1, 2):
        runners = {k: M.TFLiteRunner(b, threads=threads, batch=1) for k, b in blobs.items()}
        for bare in (False, True):
            t = interleaved(runners, x, rounds, invokes, bare)
            f, q = t["float"], t["int8"]
            print(f"| {threads} | {'bare invoke' if bare else 'TFLiteRunner'} | {f[0]:.0f} / {f[1]:.0f} | "
                  f"{q[0]:.0f} / {q[1]:.0f} | {f[0] / q[0]:.2f}x / {f[1] / q[1]:.2f}x |")
    print(f"(load {load_avg()})")


def staircase(rounds: int) -> None:
    """One conv's bare-invoke latency at every output / input count, and what the table's
    interpolation makes of the counts the learner's default grid measures."""
    import keras

    from pocketflow import metrics as M
    from pocketflow.learners.channel_pruning.counts import allowed_counts
    from pocketflow.learners.channel_pruning.latency_table import _invoke_only_ms, _step_up, _thin, convert
    print(f"\n## staircase: 3x3 same conv, batch 1, 1 thread, bare invokes, fastest of {rounds}x15 (load {load_avg()})")
    for h, C in ((28, 16), (7, 64)):
        measured = _thin([c for c in allowed_counts(C, 1, 32) if c >= 0.1 * C - 1e-9])  # the learner's default grid
        for dep in ("float", "int8"):
            for side in ("out", "in"):
                runs = {}
                for c in range(1, C + 1):
                    ci, co = (C, c) if side == "out" else (c, C)
                    inp = keras.Input((h, h, ci))
                    runs[c] = M.TFLiteRunner(convert(keras.Model(inp, keras.layers.Conv2D(co, 3, padding="same")(inp)), dep))
                t = {c: np.inf for c in runs}
                for _ in range(rounds):
                    for c, r in runs.items():
                        x = np.random.default_rng(0).random((1, h, h, r.inp["shape"][-1]), dtype=np.float32)
                        t[c] = min(t[c], _invoke_only_ms(r, x, 15, 2).min() * 1e3)
                shown = [c for c in (1, 4, 8, 9, 12, 16, 17, 24, 25, 32, 40, 48, 56, 64) if c <= C]
                print(f"- {h}x{h}, {C} ch, {dep}, vary {side}: t = " + ", ".join(f"{c}: {t[c]:.1f}" for c in shown) + " us")
                pts = [t[c] for c in measured]
                grid = [int(c) for c in allowed_counts(C, 1, 32) if c >= min(measured)]
                for what, cs in (("on the learner's grid", grid), ("at every count", list(range(min(measured), C + 1)))):
                    truth = np.array([t[c] for c in cs])
                    err = {n: fn(cs, measured, pts) / truth - 1 for n, fn in (("linear", np.interp), ("step", _step_up))}
                    print(f"    {what} ({cs[0]}..{C}, measured {measured}): linear err mean {np.mean(np.abs(err['linear'])):.1%}"
                          f" worst {err['linear'].min():+.0%}/{err['linear'].max():+.0%}; step-up err mean"
                          f" {np.mean(np.abs(err['step'])):.1%} worst {err['step'].min():+.0%}/{err['step'].max():+.0%}")
    print(f"(load {load_avg()})")


def product_rule(rounds: int) -> None:
    import keras

    from pocketflow import metrics as M
    from pocketflow.learners.channel_pruning.latency_table import _invoke_only_ms, convert
    print(f"\n## product rule t(cin,cout) = t_out(cout) t_in(cin) / t(C,C), 7x7 grid of counts per layer (load {load_avg()})")
    for h, C in ((28, 16), (14, 32), (7, 64)):
        cs = sorted({C // 8, C // 4, C * 3 // 8, C // 2, C * 5 // 8, C * 3 // 4, C})
        for dep in ("float", "int8"):
            runs = {}
            for i in cs:
                for o in cs:
                    inp = keras.Input((h, h, i))
                    runs[(i, o)] = M.TFLiteRunner(convert(keras.Model(inp, keras.layers.Conv2D(o, 3, padding="same")(inp)), dep))
            t = {k: np.inf for k in runs}
            for _ in range(rounds):
                for (i, o), r in runs.items():
                    x = np.random.default_rng(0).random((1, h, h, i), dtype=np.float32)
                    t[(i, o)] = min(t[(i, o)], _invoke_only_ms(r, x, 15, 2).min())
            err = np.array([t[(C, o)] * t[(i, C)] / t[(C, C)] / t[(i, o)] - 1 for i, o in runs])
            print(f"- {h}x{h} {C}x{C} {dep}: mean |err| {np.mean(np.abs(err)):.1%}, worst {err.min():+.0%} / {err.max():+.0%}"
                  f" (counts {cs})")
    print(f"(load {load_avg()})")


def table_vs_measured(m, rounds: int) -> None:
    """The table (the learner's default invokes: fastest of 12 per layer shape) against whole pruned
    models timed as `pruned_ms` times them (TFLiteRunner, fastest invoke), but converted once and
    interleaved over `rounds` rounds of 60 invokes (one `pruned_ms` call: a conversion each)."""
    from pocketflow import metrics as M
    from pocketflow.learners.channel_pruning.counts import channels
    from pocketflow.learners.channel_pruning.groups import analyse
    from pocketflow.learners.channel_pruning.latency_table import LatencyTable, convert, pruned_ms, side_counts
    g = analyse(m)
    full = {gr.id: gr.size for gr in g.prunable}
    variants = {"100%": full, **{f"{f:.0%}": {gr.id: channels(f, gr.size, 4, 0) for gr in g.prunable}
                                 for f in (0.75, 0.5, 0.35)}}
    print(f"\n## table prediction vs measured whole model, batch 1, 1 thread (load {load_avg()})")
    print("variant channels kept (16/32/64-wide groups): " + "; ".join(
        f"{k}: {sorted({(gr.size, c[gr.id]) for gr in g.prunable})}" for k, c in variants.items() if k != "100%"))
    x = np.random.default_rng(0).random((1, *m.input_shape[1:]), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        for deploy in ("float", "int8"):
            t0 = time.perf_counter()
            table = LatencyTable(m, g, side_counts(g, 4, 0, 0.25), settings=((1, 1),),
                                 cache=Path(tmp) / "latency_table.json", deploy=deploy)
            took = time.perf_counter() - t0
            runners = {k: M.TFLiteRunner(convert(g.prune(m, {i: np.arange(n) for i, n in c.items()}), deploy))
                       for k, c in variants.items()}
            ms = {k: np.inf for k in variants}
            for _ in range(rounds):
                for k, r in runners.items():
                    ms[k] = min(ms[k], float(M.invoke_ms(r, x, 60, warmup=5).min()))
            once = {k: pruned_ms(m, g, c, deploy=deploy) for k, c in variants.items()}
            base = table.model_ms(full, (1, 1))
            print(f"- {deploy}: table of {len(table._t)} entries measured in {took:.0f} s (load {load_avg()}); producers sum"
                  f" {base * 1e3:.0f} us, measured whole model {ms['100%'] * 1e3:.0f} us")
            print("  | variant | predicted speedup | measured speedup | measured us | one pruned_ms call us |")
            print("  |---|---|---|---|---|")
            for k, c in variants.items():
                print(f"  | {k} | {base / table.model_ms(c, (1, 1)):.2f}x | {ms['100%'] / ms[k]:.2f}x | {ms[k] * 1e3:.0f} |"
                      f" {once[k] * 1e3:.0f} |")
    print(f"(load {load_avg()})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--invokes", type=int, default=50)
    ap.add_argument("--skip", nargs="*", default=[], choices=["whole", "staircase", "product", "table"])
    a = ap.parse_args()
    import tensorflow as tf
    m, name = model()
    print(f"# {cpu_name()}, {flags()}; TF {tf.__version__}; model {name}; load {load_avg()}")
    if "whole" not in a.skip:
        whole_model(m, a.rounds, a.invokes)
    if "staircase" not in a.skip:
        staircase(a.rounds)
    if "product" not in a.skip:
        product_rule(a.rounds)
    if "table" not in a.skip:
        table_vs_measured(m, a.rounds)


if __name__ == "__main__":
    main()
