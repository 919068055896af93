"""`pocketflow` command line: a thin shell over pocketflow.api.

Errors the user can fix print one line (`pocketflow: error: ...`) and exit 2;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pocketflow")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pocketflow", description="Automated model compression for Keras 3.")
    p.add_argument("--version", action="version", version=f"pocketflow {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_like(name, help_):
        s = sub.add_parser(name, help=help_)
        s.add_argument("config", help="YAML config file")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. learner.fine_tune.epochs=2")
        s.add_argument("--output", help="parent directory of the run (default: output.dir)")
        g = s.add_mutually_exclusive_group()
        g.add_argument("--resume", action="store_true", help="continue an existing run directory")
        g.add_argument("--force", action="store_true",
                       help="replace an existing run directory (the old one is kept until the new run finishes)")
        s.add_argument("--unsafe-load", action="store_true", help="allow .keras files with Python code")
        return s

    r = run_like("run", "compress a model as the config says (search, fine-tune, export)")
    r.add_argument("--target-ratio", type=float, help="compression factor to reach (overrides target.ratio)")
    run_like("train", "train and export a float baseline")

    e = sub.add_parser("evaluate", help="test accuracy of a .keras or .tflite model")
    e.add_argument("model", help=".keras or .tflite file, or a run directory")
    e.add_argument("--data", default=None,
                   help="dataset name or .npz path (default: the run's own data, for a model inside a run directory)")
    e.add_argument("--unsafe-load", action="store_true")

    i = sub.add_parser("inspect", help="per-layer type, output shape, params and MACs")
    i.add_argument("model", help=".keras file or zoo model name")
    i.add_argument("--input-shape", default=None, help="for zoo models, e.g. 32,32,3 (default 28,28,1)")
    i.add_argument("--classes", type=int, default=10)
    i.add_argument("--unsafe-load", action="store_true")

    x = sub.add_parser("export", help="export a run's best model or a .keras file")
    x.add_argument("model", help="run directory or .keras file")
    x.add_argument("--format", action="append", choices=("keras", "saved_model", "tflite"),
                   help="repeatable (default: tflite)")
    x.add_argument("--quantize", choices=("int8", "dynamic", "float16"))
    x.add_argument("--weight-scales", default="auto", choices=("auto", "per_channel", "per_tensor", "per_tensor_dense"),
                   help="int8 weight scales (auto: per tensor where the weights sit on one grid)")
    x.add_argument("--sparse-encoding", default="off", choices=("off", "on", "auto"),
                   help="TFLite sparse tensors (auto: where the file gets smaller and runs alike)")
    x.add_argument("--data", default=None, help="dataset for int8 calibration and verification "
                   "(default: the run's own data, for a model inside a run directory)")
    x.add_argument("--output", default=None, help="directory (default: next to the model)")
    x.add_argument("--unsafe-load", action="store_true")

    b = sub.add_parser("best", help="print the best trial of a run and its checkpoint path")
    b.add_argument("run_dir")
    b.add_argument("--ratio", type=float, help="pareto runs: the most accurate exported point meeting this ratio")
    b.add_argument("--metric", help="the ratio's metric (default: the run's first objective)")
    f = sub.add_parser("front", help="print a pareto run's front as a table")
    f.add_argument("run_dir")
    return p


def _data_cfg(spec: str | None):
    if spec is None:
        return None
    if spec.endswith(".npz") or os.path.sep in spec:
        return {"name": None, "path": spec, "val_split": 0.0}
    return {"name": spec, "val_split": 0.0}


def _cmd_run(args, train_only=False):
    from pocketflow import api
    sets = list(args.set) + (["model.unsafe_load=true"] if args.unsafe_load else [])
    fn = api.train if train_only else api.compress
    kw = {} if train_only else {"target_ratio": args.target_ratio}
    res = fn(args.config, sets, output=args.output, resume=args.resume, force=args.force, **kw)
    from pocketflow.distributed import world
    if world().is_root:
        print(f"best checkpoint: {res.best_dir / 'model.keras'}")
    return 0


def _cmd_inspect(args):
    from pocketflow.metrics import format_table, layer_costs
    from pocketflow.zoo import MODELS, build_model, load_keras_file
    if args.model in MODELS or not (args.model.endswith((".keras", ".h5")) or os.path.sep in args.model):
        MODELS.get(args.model)
        shape = tuple(int(v) for v in (args.input_shape or "28,28,1").split(","))
        model = build_model(args.model, shape, args.classes)
    else:
        model = load_keras_file(args.model, args.unsafe_load)
    print(f"model {model.name}: input {tuple(model.input_shape[1:])}")
    print(format_table(layer_costs(model)))
    return 0


def _cmd_evaluate(args):
    from pocketflow import api
    res = api.evaluate(args.model, _data_cfg(args.data), unsafe_load=args.unsafe_load)
    print(f"test accuracy: {res['test_accuracy']:.4f}")
    return 0


def _cmd_export(args):
    from pocketflow import api
    res = api.export(args.model, args.format or ("tflite",), args.quantize, _data_cfg(args.data), args.output,
                     args.weight_scales, args.unsafe_load, args.sparse_encoding)
    for k, v in res["files"].items():
        extra = f", {v['bytes']:,} bytes" if "bytes" in v else ""
        acc = f", test accuracy {v['test_accuracy']:.4f}" if "test_accuracy" in v else ""
        print(f"{k}: {v['path']}{extra}{acc}")
    return 0


def _cmd_best(args):
    from pocketflow import api
    m = api.best(args.run_dir, args.ratio, args.metric)
    if "pareto" in m:
        print(f"pareto point: {m['pareto']['point']}")
    trial = m.get("search", {}).get("best_trial")
    if trial is not None:
        print(f"best trial: #{trial}")
    print(f"params: {m['params']}")
    print(f"test accuracy: {m['test_accuracy']:.4f}")
    from pocketflow.targets import ratio_line
    print("ratios: " + (ratio_line(m["measured"]) if "measured" in m else
                        ", ".join(f"{k} {v:.2f}x" for k, v in m["ratios"].items())))
    print(f"checkpoint: {m['checkpoint']}")
    return 0


def _cmd_front(args):
    from pocketflow.front import front_lines
    print("\n".join(front_lines(args.run_dir)))
    return 0


COMMANDS = {"run": _cmd_run, "train": lambda a: _cmd_run(a, train_only=True), "inspect": _cmd_inspect,
            "evaluate": _cmd_evaluate, "export": _cmd_export, "best": _cmd_best, "front": _cmd_front}


def _stop_signals() -> None:
    """SIGINT and SIGTERM stop a run like Ctrl-C: the running trial is marked, files stay whole.
    SIGINT is restored even when inherited as ignored (a job started with `&` from a script). An
    error raised after a stop signal is the stop, whatever a library made of the interrupt."""
    from pocketflow.errors import request_stop, reset_stop
    reset_stop()
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _stop_signals()
    if args.debug:
        os.environ["POCKETFLOW_DEBUG"] = "1"
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from pocketflow.errors import PocketFlowError, stop_requested
    from pocketflow.io import quiet_stderr
    try:
        with quiet_stderr():  # TensorFlow's import-time CUDA probe noise
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")  # triggers cuInit, which logs on machines without GPUs
        return COMMANDS[args.command](args)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or (isinstance(e, Exception) and stop_requested()):
            # (a KeyboardInterrupt that TensorFlow or Keras re-raised as an error of their own)
            print("pocketflow: interrupted", file=sys.stderr)
            return 130
        if args.debug or not isinstance(e, (PocketFlowError, MemoryError, OSError)):
            raise
        if isinstance(e, PocketFlowError):
            print(f"pocketflow: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, MemoryError):
            print("pocketflow: error: out of memory", file=sys.stderr)
            return 1
        print(f"pocketflow: error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": "),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
