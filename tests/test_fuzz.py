"""A property-based fuzzer over what a careless user can hand PocketFlow (issue 15).

Each case mutates a valid run — config keys, types, values, ratios and paths; the dataset's shape,
layout, dtype, label encoding and size; the model's input shape, class count and layers — and runs
the real CLI entry point in-process (`pocketflow.cli.main`, as `pocketflow run` does). For every
case: success (exit 0) or exit 2 with exactly one line `pocketflow: error: ...`; never a traceback
or another exit code; and a finished run directory already there stays byte-identical unless the
new run succeeded. On a failure the case is kept on disk with a command that replays it, and
hypothesis prints the seed (`pytest tests/test_fuzz.py --hypothesis-seed=N`).

POCKETFLOW_FUZZ_EXAMPLES sets the number of cases (default 300, about 2-3 minutes on 2 cores).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import SMALL_NPZ, run_cli_inprocess  # noqa: E402

EXAMPLES = int(os.environ.get("POCKETFLOW_FUZZ_EXAMPLES", "300"))
KEEP = Path(os.environ.get("POCKETFLOW_FUZZ_KEEP", "/tmp/pocketflow-fuzz-failures"))

BAD_VALUES = [None, -1, 0, 0.5, 1, 2.5, 1e9, float("nan"), "x", "", [], {}, True, [1, "a"], {"a": 1},
              "../missing.npz", "fashoin_mnist", "auto", "int8"]
KEYS = [("seed",), ("name",), ("plugins",), ("data", "name"), ("data", "path"), ("data", "val_split"),
        ("data", "limit_train"), ("data", "augment"), ("model", "name"), ("model", "pretrained"),
        ("model", "args"), ("model", "imports"), ("model", "unsafe_load"), ("train", "epochs"),
        ("train", "steps"), ("train", "batch_size"), ("train", "optimizer"), ("train", "learning_rate"),
        ("train", "schedule"), ("learner", "name"), ("learner", "fine_tune", "steps"),
        ("learner", "fine_tune", "batch_size"), ("learner", "sparsity"), ("learner", "bits"),
        ("target", "metric"), ("target", "ratio"), ("search", "optimizer"), ("search", "trials"),
        ("search", "space"), ("search", "fix"), ("search", "pruner"), ("export", "formats"),
        ("export", "quantize"), ("output", "dir")]
LEARNERS = ["full_precision", "weight_sparsity", "nonuniform_quant"]
LAYOUTS = ["nhwc", "nchw", "flat", "hw", "rgb"]
LABELS = ["index", "onehot", "out_of_range", "negative", "float", "column"]
MODELS = ["zoo", "file_ok", "file_rgb", "file_5_classes", "file_two_outputs", "file_lambda", "dir", "garbage"]


# -- the artefacts every case picks from ------------------------------------------------------------
def _write_models(d: Path) -> dict[str, Path]:
    import keras
    keras.utils.set_random_seed(0)

    def cnn(shape, classes, two=False, lam=False):
        x = inp = keras.Input(shape)
        x = keras.layers.Conv2D(4, 3, activation="relu")(x)
        if lam:
            x = keras.layers.Lambda(lambda t: t * 1.0)(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outs = [keras.layers.Dense(classes)(x)] + ([keras.layers.Dense(2)(x)] if two else [])
        return keras.Model(inp, outs if two else outs[0])

    paths = {"file_ok": cnn((28, 28, 1), 10), "file_rgb": cnn((32, 32, 3), 10),
             "file_5_classes": cnn((28, 28, 1), 5), "file_two_outputs": cnn((28, 28, 1), 10, two=True),
             "file_lambda": cnn((28, 28, 1), 10, lam=True)}
    out = {}
    for name, m in paths.items():
        out[name] = d / f"{name}.keras"
        m.save(out[name])
    (d / "a_directory.keras").mkdir()
    out["dir"] = d / "a_directory.keras"
    out["garbage"] = d / "garbage.keras"
    out["garbage"].write_bytes(b"not a zip file")
    return out


class Arena(dict):
    """The shared artefacts; a short repr keeps hypothesis's failure report readable."""
    def __init__(self, **kw):
        super().__init__(kw)

    def __repr__(self):
        return f"Arena({self['dir']})"


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    with np.load(SMALL_NPZ) as z:
        base = {k: z[k] for k in z.files}
    old = Path.cwd()
    os.chdir(d)  # relative paths a case invents stay inside the arena
    try:
        yield Arena(dir=d, base=base, models=_write_models(d))
    finally:
        os.chdir(old)


# -- strategies ---------------------------------------------------------------------------------------
# Each dimension of a case is faulty with probability 1/FAULT_ODDS (then drawn from everything,
# valid values included), otherwise drawn from its valid values: about a quarter of the cases are
# whole runs (the costly ones), a third carry one fault, the rest several. So every check is
# reached, the late ones too, and a run directory a failure must leave alone usually exists.
FAULT_ODDS = 6
DIMENSIONS = {  # name: (valid values, every value)
    "layout": (["nhwc", "nhwc", "hw"], LAYOUTS),
    "dtype": (["uint8", "float32", "float64", "int32", "bool"], ["uint8", "float32", "int32", "bool", "complex64"]),
    "labels": (["index", "index", "onehot", "column"], LABELS),
    "n_train": ([120, 120, 7, 2], [0, 1, 2, 7, 120]),
    "n_test": ([40, 40, 1], [0, 1, 40]),
    "mismatch": ([False], [False, True]),
    "drop": ([None], [None, "x_test", "y_train"]),
    "model": (["zoo", "zoo", "file_ok"], MODELS),
    "ratio": ([None], [None, 1.5, 4.0, 1e6, 0.5]),
}


def _pick(draw, name):
    valid, every = DIMENSIONS[name]
    faulty = draw(st.integers(0, FAULT_ODDS - 1)) == 0
    return draw(st.sampled_from(every if faulty else valid))


@st.composite
def mutations(draw):
    if draw(st.integers(0, FAULT_ODDS - 1)) != 0:
        return []
    out = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "delete", "unknown"]))
        key = draw(st.sampled_from(KEYS))
        out.append((op, key, draw(st.sampled_from(BAD_VALUES))))
    return out


@st.composite
def cases(draw):
    data = {k: _pick(draw, k) for k in ("layout", "dtype", "labels", "n_train", "n_test", "mismatch", "drop")}
    learner = draw(st.sampled_from(LEARNERS))
    ratio = _pick(draw, "ratio")
    if ratio is None and learner != "full_precision" and draw(st.booleans()):
        ratio = draw(st.sampled_from([1.5, 4.0]))  # reachable by sparsity and codebooks
    return {"data": data, "model": _pick(draw, "model"), "learner": learner, "ratio": ratio,
            "mutations": draw(mutations()), "flags": draw(st.sampled_from([["--force"], ["--force"], [], ["--resume"]]))}


# -- building and running one case --------------------------------------------------------------------
def _images(x: np.ndarray, layout: str, dtype: str) -> np.ndarray:
    x = x.reshape(-1, 28, 28, 1)
    x = {"nhwc": x, "nchw": x.transpose(0, 3, 1, 2), "flat": x.reshape(len(x), 784), "hw": x[..., 0],
         "rgb": np.repeat(x, 3, axis=-1)}[layout]
    if dtype == "bool":
        return x > 127
    return x.astype(dtype)  # complex64: not an image type at all


def _labels(y: np.ndarray, kind: str) -> np.ndarray:
    y = y.astype(np.int64)
    return {"index": y, "onehot": np.eye(10, dtype=np.float32)[y], "out_of_range": y + 10, "negative": -y - 1,
            "float": y.astype(np.float32) + 0.5, "column": y[:, None]}[kind]


def _write_data(path: Path, base: dict, spec: dict) -> None:
    arrays = {"x_train": _images(base["x_train"][: spec["n_train"]], spec["layout"], spec["dtype"]),
              "y_train": _labels(base["y_train"][: spec["n_train"]], spec["labels"]),
              "x_test": _images(base["x_test"][: spec["n_test"]], spec["layout"], spec["dtype"]),
              "y_test": _labels(base["y_test"][: spec["n_test"]], spec["labels"])}
    if spec["mismatch"]:
        arrays["y_train"] = arrays["y_train"][1:]
    if spec["drop"]:
        arrays.pop(spec["drop"])
    np.savez(path, **arrays)


def _config(arena: dict, case: dict, data_path: Path) -> dict:
    model = ({"name": "seed_cnn"} if case["model"] == "zoo" else
             {"name": str(arena["models"][case["model"]]), "pretrained": True})
    cfg = {"name": "fz", "data": {"name": "npz", "path": str(data_path), "val_split": 0.2},
           "model": model, "train": {"steps": 1, "batch_size": 16, "verbose": False},
           "learner": {"name": case["learner"], "fine_tune": {"steps": 1, "batch_size": 16, "verbose": False}},
           "target": {"metric": "packed_size", "ratio": case["ratio"]},
           "search": {"optimizer": "none"}, "export": {"formats": ["keras"], "verify": False},
           "output": {"dir": str(arena["dir"] / "runs")}}
    for op, key, value in case["mutations"]:
        node = cfg
        for k in key[:-1]:
            node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
        if op == "set":
            node[key[-1]] = value
        elif op == "delete":
            node.pop(key[-1], None)
        else:
            node[f"{key[-1]}_typo"] = value
    return cfg


def _tree_hash(d: Path) -> dict:
    if not d.exists():
        return {}
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _run(argv: list[str]) -> tuple[int, str, str]:
    proc = run_cli_inprocess(*argv, cwd=Path.cwd())
    return proc.returncode, proc.stdout, proc.stderr


def _keep(case_dir: Path, cfg_path: Path, flags: list) -> str:
    KEEP.mkdir(parents=True, exist_ok=True)
    dst = KEEP / case_dir.name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(case_dir, dst)
    return f"replay: cd {dst} && python -m pocketflow run {dst / cfg_path.name} {' '.join(flags)}"


@settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(case=cases())
def test_every_input_either_runs_or_fails_in_one_line(arena, case):
    case_dir = Path(arena["dir"]) / f"case_{hashlib.sha1(repr(case).encode()).hexdigest()[:10]}"
    case_dir.mkdir(exist_ok=True)
    data_path = case_dir / "data.npz"
    _write_data(data_path, arena["base"], case["data"])
    cfg = _config(arena, case, data_path)
    cfg_path = case_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = arena["dir"] / "runs" / "fz"
    before = _tree_hash(run_dir)
    rc, out, err = _run(["run", str(cfg_path), *case["flags"]])
    replay = _keep(case_dir, cfg_path, case["flags"]) if rc not in (0, 2) or "Traceback" in out + err else ""
    assert "Traceback" not in out + err, f"traceback\n{err[-3000:]}\n{replay}"
    assert rc in (0, 2), f"exit {rc}\n{err[-3000:]}\n{replay}"
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("pocketflow: error: "), \
            f"{err[-3000:]}\n{_keep(case_dir, cfg_path, case['flags'])}"
        assert _tree_hash(run_dir) == before, f"a failed run changed the previous run\n" + _keep(
            case_dir, cfg_path, case["flags"])
    shutil.rmtree(case_dir, ignore_errors=True)
