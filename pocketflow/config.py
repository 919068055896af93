"""The one config schema, validated once on load.

Every section is declared with `Field`s; learner-specific keys are declared by the
learner class itself (`Learner.params`) and validated by the same code. Errors are
one line naming the file and the dotted key.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pocketflow.errors import ConfigError, PocketFlowError
from pocketflow.plugins import import_modules
from pocketflow.registry import did_you_mean
from pocketflow.targets import ALIASES, FILE_METRICS, METRICS, canonical
from pocketflow.schema import (DISTILL, TRAIN, Field, check_value, image_size, in_unit,  # noqa: F401
                               non_negative, plain_name, positive, validate_section)

TARGET_METRICS = tuple(METRICS) + tuple(ALIASES)

SCHEMA: dict[str, Field] = {
    "name": Field(str, "run", check=plain_name, help="run name: output goes to <output.dir>/<name>"),
    "seed": Field(int, 0, check=non_negative),
    "plugins": Field(list, [], help="modules imported before validation: they register learners or optimizers"),
    "data": Field(schema={
        "name": Field((str, type(None)), None, help="mnist | fashion_mnist | cifar10 | cifar100 | npz | directory"),
        "path": Field((str, type(None)), None, help=".npz file or image directory"),
        "val_split": Field(float, 0.1, check=in_unit),
        "augment": Field(bool, False, help="random 2-pixel shift + horizontal flip"),
        "limit_train": Field((int, type(None)), None, check=positive, help="use only the first N training images"),
        "limit_test": Field((int, type(None)), None, check=positive),
        "image_size": Field((list, type(None)), None, check=image_size, help="[h, w] for image directories"),
    }),
    "model": Field(schema={
        "name": Field((str, type(None)), None, help="zoo name, a .keras path or module:function"),
        "args": Field(dict, {}, open=True),
        "pretrained": Field((bool, type(None)), None, help="skip baseline training (default: true for files)"),
        "unsafe_load": Field(bool, False, help="allow Lambda layers etc. when loading .keras"),
        "imports": Field(list, [], help="modules to import first (they register custom layers)"),
    }),
    "train": Field(schema=TRAIN),
    "learner": Field(schema={
        "name": Field(str, "full_precision"),
        "fine_tune": Field(schema=TRAIN),
        "distill": Field(schema=DISTILL),
        # learner-specific keys are validated against the learner's own `params`
    }, open=True),
    "target": Field(schema={
        "metric": Field(str, "size", choices=TARGET_METRICS,
                        help="size | download_size | latency (the shipped TFLite file) | flops | params | "
                             "packed_size (compression: its alias)"),
        "ratio": Field((float, type(None)), None),
        "batch": Field(int, 1, check=positive, help="latency: the batch the file is timed at"),
        "threads": Field(int, 1, check=positive, help="latency: interpreter threads"),
    }),
    "search": Field(schema={
        "optimizer": Field(str, "none", help="none | tpe | gp | random | grid | nsga2"),
        "objective": Field(str, "accuracy", choices=("accuracy", "pareto"),
                           help="accuracy (at target.ratio) | pareto (the front of search.objectives)"),
        "objectives": Field(list, [], help="pareto: accuracy, then target metrics, e.g. [accuracy, download_size]"),
        "pareto_points": Field((int, type(None)), None, check=positive,
                               help="pareto: front points fine-tuned and exported (spread evenly); none: all"),
        "trials": Field(int, 10, check=positive),
        "storage": Field((str, type(None)), None, help="SQLAlchemy URL; default sqlite in the run dir"),
        "study_name": Field((str, type(None)), None),
        "pruner": Field(str, "median", choices=("none", "median", "halving")),
        "trial_epochs": Field((int, float), 1, check=positive),
        "trial_steps": Field((int, type(None)), None, check=positive),
        "fix": Field(dict, {}, open=True, help="dimension -> fixed value"),
        "space": Field(dict, {}, open=True, help="dimension -> [low, high] or list of choices"),
        "timeout": Field((int, float, type(None)), None, check=positive, help="seconds"),
        "rank": Field(schema={  # a cheap ranking stage before each trial's fine-tune (pocketflow.hpo.fidelity)
            "stage": Field(str, "none", choices=("none", "zero_shot", "short"),
                           help="none | zero_shot (no fine-tune, BatchNorm re-estimated) | short (a fraction "
                                "of the trial's fine-tune)"),
            "keep": Field(float, 0.5, check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
                          help="share of ranked trials that go on to the fine-tune (1: rank, never prune)"),
            "warmup": Field(int, 4, check=non_negative, help="trials ranked before any is pruned"),
            "images": Field(int, 2000, check=positive, help="validation images the stage scores on"),
            "fraction": Field(float, 0.1, check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
                              help="short: its share of the trial's fine-tune"),
        }),
    }),
    "export": Field(schema={
        "formats": Field(list, ["keras", "tflite"]),
        "quantize": Field((str, type(None)), None, choices=(None, "int8", "dynamic", "float16")),
        "verify": Field(bool, True, help="run the TFLite model and compare with Keras"),
        "weight_scales": Field(str, "auto", choices=("auto", "per_channel", "per_tensor", "per_tensor_dense"),
                               help="int8 weight scales; auto: per tensor where the trained weights sit on one grid"),
        "sparse_encoding": Field(str, "off", choices=("off", "on", "auto"),
                                 help="TFLite sparse tensor encoding; auto: where it shrinks the file and runs"),
    }),
    "output": Field(schema={
        "dir": Field(str, "runs"),
    }),
}


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. learner.fine_tune.epochs=2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides or ():
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text}: '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


@dataclass
class Config:
    """The resolved, validated configuration (plain nested dicts) plus where it came from."""
    data: dict
    source: str = "<dict>"
    raw: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # decisions made for the user (learner: auto), to print

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    def to_yaml(self) -> str:
        """The resolved config as YAML (the run's config.yaml); a storage password is masked."""
        from pocketflow.io import redact_url, to_builtin
        data = to_builtin(self.data)
        data["search"]["storage"] = redact_url(data["search"]["storage"])
        data["learner"].pop("resolved", None)  # learner: auto's methods as chains: derived on load
        return yaml.safe_dump(data, sort_keys=False)


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(source=None, overrides=(), target_ratio=None, **sections) -> Config:
    """Load and validate a config from a YAML path or a dict (plus --set style overrides)."""
    if source is None:
        raw, name = {}, "<dict>"
    elif isinstance(source, dict):
        raw, name = copy.deepcopy(source), "<dict>"
    else:
        raw, name = read_yaml(source), str(source)
    for k, v in sections.items():
        raw[k] = v
    raw = apply_overrides(raw, overrides)
    if target_ratio is not None:
        raw.setdefault("target", {})
        if not isinstance(raw["target"], dict):
            raise ConfigError(f"{name}: 'target' must be a mapping")
        raw["target"]["ratio"] = target_ratio
    plugins = raw.get("plugins") or []
    if not (isinstance(plugins, list) and all(isinstance(m, str) for m in plugins)):
        raise ConfigError(f"{name}: 'plugins' must be a list of module names, got {plugins!r}")
    try:
        import_modules(plugins, "plugins")
    except PocketFlowError as e:
        raise ConfigError(f"{name}: {e}") from None
    notes = _resolve_metric(raw) + _resolve_learner(raw)
    data = validate_section(raw, SCHEMA, "", name)
    _validate_cross(data, name)
    _refuse_ignored(raw, data, name)
    return Config(data=data, source=name, raw=raw, notes=notes)


def _resolve_metric(raw: dict) -> list[str]:
    """An alias of a target metric (`compression`) is replaced by its name, with a notice."""
    target = raw.get("target")
    if not (isinstance(target, dict) and isinstance(target.get("metric"), str)):
        return []
    target["metric"], note = canonical(target["metric"])
    return [note] if note else []


def _resolve_learner(raw: dict) -> list[str]:
    """`learner: NAME` is short for `learner: {name: NAME}`; `auto` gets the methods it searches
    from the target metric (pocketflow.learners.auto). Returns what was decided, for the log."""
    sec = raw.get("learner")
    if isinstance(sec, str):
        sec = raw["learner"] = {"name": sec}
    if not (isinstance(sec, dict) and sec.get("name") == "auto"):
        return []
    target = raw.get("target") if isinstance(raw.get("target"), dict) else {}
    metric = target.get("metric", SCHEMA["target"].schema["metric"].default)
    from pocketflow.learners.auto import resolve_auto
    try:
        raw["learner"], note = resolve_auto(sec, metric)
    except PocketFlowError as e:
        raise ConfigError(str(e)) from None
    return [note] if note else []


def _validate_cross(d: dict, source: str) -> None:
    """Checks that span sections or depend on registries (learners, datasets, optimizers)."""
    from pocketflow.learners import LEARNERS, validate_learner_section

    ratio = d["target"]["ratio"]
    if ratio is not None and not ratio > 1:
        raise ConfigError(f"{source}: 'target.ratio' must be > 1 (a compression factor), got {ratio!r}")
    metric = d["target"]["metric"]
    if metric in FILE_METRICS and ratio is not None and "tflite" not in d["export"]["formats"]:
        raise ConfigError(f"{source}: target metric '{metric}' is measured on the TFLite file the run ships; "
                          "add tflite to export.formats")
    LEARNERS.get(d["learner"]["name"]) if d["learner"]["name"] in LEARNERS else _unknown(
        "learner.name", d["learner"]["name"], LEARNERS.names(), source)
    validate_learner_section(d["learner"], source)
    from pocketflow.hpo import OPTIMIZERS
    from pocketflow.hpo.pareto import validate as validate_pareto
    validate_pareto(d, source)
    opt = d["search"]["optimizer"]
    if opt != "none" and opt not in OPTIMIZERS:
        _unknown("search.optimizer", opt, ["none"] + OPTIMIZERS.names(), source)
    for fmt in d["export"]["formats"]:
        if fmt not in ("keras", "saved_model", "tflite"):
            raise ConfigError(f"{source}: 'export.formats' has unknown format {fmt!r}; "
                              "choose from keras, saved_model, tflite")
    if d["data"]["name"] is None and d["data"]["path"] is None:
        raise ConfigError(f"{source}: missing required key 'data.name' (or 'data.path')")
    if d["model"]["name"] is None:
        raise ConfigError(f"{source}: missing required key 'model.name'")


SEARCH_ONLY = ("trials", "fix", "space", "pruner", "trial_epochs", "trial_steps", "timeout", "storage",
               "study_name", "objective", "objectives", "pareto_points")
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")


def _given(raw: dict, section: str) -> dict:
    """The keys the user wrote in a section (not the defaults)."""
    sec = raw.get(section)
    return sec if isinstance(sec, dict) else {}


def _ignored_keys(raw: dict, d: dict) -> list[tuple[str, str]]:
    """(key, why) for every key the user set that the resolved config would silently ignore."""
    out = []
    if d["search"]["optimizer"] == "none":
        out += [(f"search.{k}", "with search.optimizer: none (one run at the learner's defaults); set "
                 "search.optimizer to tpe, gp, random or grid, or remove it") for k in SEARCH_ONLY
                # at its default a key says nothing (a run's own config.yaml lists every key)
                if k in _given(raw, "search") and _given(raw, "search")[k] != SCHEMA["search"].schema[k].default]
    if d["search"]["optimizer"] != "none" and d["search"]["objective"] != "pareto":
        out += [(f"search.{k}", "without search.objective: pareto; set it or remove the key")
                for k in ("objectives", "pareto_points") if _given(raw, "search").get(k) not in (None, [])]
    data, given = d["data"], _given(raw, "data")
    if data["name"] in KERAS_DATASETS and given.get("path") is not None:
        out.append(("data.path", f"with data.name: {data['name']} (a named dataset); to read the file set "
                    "data.name to npz or directory, or remove data.name"))
    is_dir = data["name"] == "directory" or (data["name"] is None and Path(data["path"] or "").is_dir())
    if given.get("image_size") is not None and not is_dir:
        out.append(("data.image_size", "except for an image directory (data.name: directory); resize "
                    "the arrays themselves"))
    name = d["model"]["name"] or ""
    if _given(raw, "model").get("args") and (name.endswith((".keras", ".h5")) or "/" in name):
        out.append(("model.args", f"for a saved model file ({name}): they are arguments of zoo or "
                    "module:function models; remove them"))
    if d["export"]["quantize"] is not None and "tflite" not in d["export"]["formats"]:
        out.append(("export.quantize", "without tflite in export.formats; add tflite or remove it"))
    learner = d["learner"]
    distill = _given(_given(raw, "learner"), "distill")
    if learner["name"] not in ("distillation", "chain", "auto") and not learner["distill"]["enabled"]:
        out += [(f"learner.distill.{k}", "unless learner.distill.enabled is true; enable it or remove it")
                for k in ("temperature", "weight") if k in distill and distill[k] != DISTILL[k].default]
    return out


def _refuse_ignored(raw: dict, d: dict, source: str) -> None:
    """A key that has no effect in the mode chosen is a mistake the user should hear of."""
    found = _ignored_keys(raw, d)
    if found:
        key, why = found[0]
        raise ConfigError(f"{source}: '{key}' has no effect {why}")


def _unknown(key, value, choices, source):
    raise ConfigError(f"{source}: '{key}' unknown value {value!r}{did_you_mean(value, choices)}; "
                      f"choose from: {', '.join(choices)}")
