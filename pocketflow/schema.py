"""The config-schema mechanism: `Field`, value checks and `validate_section`, plus the two
sections learners share (`TRAIN`, `DISTILL`).

Why a module of its own: learners declare their keys with `Field` and validate with
`validate_section`, and the config validates learner sections; keeping the mechanism here lets
both depend on it without depending on each other.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

from pocketflow.errors import ConfigError
from pocketflow.registry import did_you_mean

_MISSING = object()


@dataclass
class Field:
    """One config key: its type(s), default, and an optional check returning an error or None."""
    type: type | tuple = object
    default: Any = None
    required: bool = False
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""
    schema: dict | None = None  # nested section
    open: bool = False  # nested dict with free keys


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def in_unit(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def plain_name(v):
    """A run name is one directory under output.dir: never empty, never a path out of it."""
    return None if v.strip() and v not in (".", "..") and "/" not in v and "\\" not in v else \
        "must be a plain directory name (no '/', not empty)"


def image_size(v):
    ok = len(v) == 2 and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)
    return None if ok else "must be [height, width], two positive integers"


def _type_name(t) -> str:
    if isinstance(t, tuple):
        names = [_type_name(x) for x in t if not (x is int and float in t)]
        return " or ".join(names)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            list: "a list", dict: "a mapping", type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def _is_type(value, t) -> bool:
    if isinstance(t, tuple):
        return any(_is_type(value, x) for x in t)
    if t is object:
        return True
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


TRAIN = {
    "epochs": Field((int, float), 5, check=non_negative, help="passes over the training split (0: none)"),
    "steps": Field((int, type(None)), None, check=positive, help="stop after this many steps (overrides epochs)"),
    "batch_size": Field(int, 128, check=positive),
    "optimizer": Field(str, "adam", choices=("adam", "sgd", "rmsprop", "adamw")),
    "learning_rate": Field(float, 1e-3, check=positive),
    "schedule": Field(str, "constant", choices=("constant", "cosine", "step")),
    "momentum": Field(float, 0.9, check=non_negative),
    "weight_decay": Field(float, 0.0, check=non_negative),
    "label_smoothing": Field(float, 0.0, check=in_unit),
    "scale_lr": Field(bool, True, help="multiply the learning rate by the Horovod world size"),
    "early_stopping": Field((int, type(None)), None, check=positive, help="patience in epochs on validation accuracy"),
    "recalibrate_bn": Field(bool, True, help="learner.fine_tune: BatchNorm statistics re-estimated after it on 512 "
                            "training images, kept where validation accuracy does not drop"),
    "tensorboard": Field(bool, False),
    "verbose": Field(bool, True),
}

DISTILL = {
    "enabled": Field(bool, False),
    "temperature": Field(float, 4.0, check=positive),
    "weight": Field(float, 0.5, check=non_negative),
}

def _defaults(schema: dict) -> dict:
    out = {}
    for k, f in schema.items():
        out[k] = _defaults(f.schema) if f.schema is not None else copy.deepcopy(f.default)
    return out


def validate_section(values: dict, schema: dict, where: str, source: str, open_: bool = False) -> dict:
    """Merge `values` over the schema defaults and check every key; return the resolved dict."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{where}' must be a mapping, got {type(values).__name__}")
    out = _defaults(schema)
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else str(key)
        f = schema.get(key)
        if f is None:
            if open_:
                out[key] = value
                continue
            raise ConfigError(f"{source}: unknown key '{dotted}'{did_you_mean(key, schema)}")
        if f.schema is not None:
            out[key] = validate_section(value, f.schema, dotted, source, f.open)
            continue
        out[key] = check_value(value, f, dotted, source)
    for key, f in schema.items():
        if f.required and values.get(key, _MISSING) is _MISSING:
            raise ConfigError(f"{source}: missing required key '{where + '.' if where else ''}{key}'")
    return out


def check_value(value, f: Field, dotted: str, source: str):
    if isinstance(f.type, tuple) and float in f.type or f.type is float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if f.type is float else value
    if not _is_type(value, f.type):
        raise ConfigError(f"{source}: '{dotted}' must be {_type_name(f.type)}, got {value!r}")
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"{source}: '{dotted}' must be one of {', '.join(map(str, f.choices))}; "
                          f"got {value!r}{did_you_mean(value, f.choices)}")
    if f.check is not None and value is not None:
        msg = f.check(value)
        if msg:
            raise ConfigError(f"{source}: '{dotted}' {msg}, got {value!r}")
    return value
