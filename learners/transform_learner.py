"""`TransformLearner`: the base every kernel-transform learner shares (weight sparsity, uniform
and non-uniform quantization), so they wrap, fine-tune, strip, measure and export the same way
and `chain` can stack them; plus the config keys they all accept (`COMMON_PARAMS`).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import numpy as np

from pocketflow.errors import PocketFlowError
from pocketflow.learners.accounting import KernelRep, base_reps, export_packed, package, ratio_from_reps
from pocketflow.learners.base import Compressed, Learner
from pocketflow.learners.kernels import kernel_variable
from pocketflow.learners.wrap import all_layers, check_cloneable, kernel_layers, wrap_model
from pocketflow.registry import did_you_mean
from pocketflow.schema import Field, non_negative
from pocketflow.targets import SIZE_METRICS


def _check_names(v):
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        return "must be a list of layer names"
    return None


def per_layer_field(check: Callable, what: str) -> Field:
    """`per_layer: {layer: value}` overriding the uniform value; values checked like the uniform one."""
    def _check(d):
        for k, v in d.items():
            msg = check(v)
            if msg:
                return f"entry '{k}' {msg}"
        return None
    return Field(dict, {}, check=_check, help=f"layer name -> {what}, overriding the uniform value")


COMMON_PARAMS = {
    "skip": Field(list, [], check=_check_names, help="kernel layers left uncompressed"),
    "skip_first": Field(bool, False, help="leave the first kernel layer uncompressed"),
    "skip_last": Field(bool, False, help="leave the last kernel layer uncompressed"),
    "min_params": Field(int, 0, check=non_negative, help="leave kernels with fewer weights uncompressed"),
}


class TransformLearner(Learner):
    """A learner that compresses by kernel transforms in the forward pass.

    Subclasses declare the per-layer knob (`dim`: 'sparsity' or 'bits', one search dimension
    `<dim>/<layer>` per layer), the transforms it adds (`make_transforms`), training hooks and
    `describe` (the predicted storage). This base does the rest the same way for all of them:
    wrapping on top of whatever is already wrapped (so `chain` can stack steps), fine-tuning,
    stripping, exact size accounting, prediction for `project`, and the packed export.
    """
    metrics = ("packed_size", "size", "download_size")
    dim: ClassVar[str] = "value"
    value_field: ClassVar[str] = "value"   # the uniform config key (e.g. 'sparsity', 'bits')
    #: where this learner's keys sit in the config, for messages (`chain` sets learner.<step>)
    config_key = "learner"

    # -- per-learner ------------------------------------------------------------------------
    def check_value(self, v) -> str | None:
        """An error message if `v` is not a valid per-layer value."""
        return None

    def dimension(self, name: str, layer):
        raise NotImplementedError

    def active(self, value) -> bool:
        """Whether a layer with this value gets transforms at all."""
        return True

    def prepare(self, model):
        """A graph rewrite applied once before wrapping (folding BatchNorm); returns a model."""
        return model

    def prepared_params(self, model) -> int:
        """Parameter count of `prepare(model)`, computed without building it."""
        from pocketflow.metrics import count_params
        return count_params(model)

    def make_transforms(self, name: str, layer, value, existing: list) -> list:
        raise NotImplementedError

    def output_bits(self, name: str, value) -> int | None:
        return None

    def train_hooks(self, wrapped, values: dict, data, budget) -> list:
        return []

    def before_training(self, wrapped, data) -> None:
        pass

    def finish(self, wrapped, values: dict, hooks: list) -> None:
        """After fine-tuning (e.g. final masks when the schedule did not get there)."""

    def describe(self, rep: KernelRep, value) -> KernelRep:
        """The predicted representation of a kernel after this learner (value = its setting)."""
        raise NotImplementedError

    # -- layers and params --------------------------------------------------------------------
    def candidates(self, model) -> list[str]:
        """Kernel layers this learner may touch, after the skip rules."""
        layers = list(kernel_layers(model))
        c = self.cfg
        skip = set(c.get("skip") or ())
        if c.get("skip_first") and layers:
            skip.add(layers[0][0])
        if c.get("skip_last") and layers:
            skip.add(layers[-1][0])
        return [n for n, layer, _ in layers if n not in skip and
                int(np.prod(kernel_variable(layer).shape)) >= (c.get("min_params") or 0)]

    def check(self, model) -> None:
        """One-line errors for layer names in the config that the model does not have."""
        check_cloneable(model)
        names = [n for n, _, _ in kernel_layers(model)]
        where = self.config_key
        for key in ("skip", "per_layer"):
            for n in self.cfg.get(key) or ():
                if n not in names:
                    kind = "" if n not in [layer.name for layer in all_layers(model)] else " kernel"
                    raise PocketFlowError(
                        f"{where}.{key}: model '{model.name}' has no{kind} layer '{n}'{did_you_mean(n, names)}; "
                        f"its Conv2D/DepthwiseConv2D/Dense layers are: {', '.join(names) or 'none'}")
        cands = self.candidates(model)
        for n in self.cfg.get("per_layer") or ():
            if n not in cands:
                raise PocketFlowError(f"{where}.per_layer: layer '{n}' is excluded by the skip rules")
        if not cands:
            raise PocketFlowError(f"{where}: no layer left to compress in model '{model.name}' "
                                  "(check skip, skip_first, skip_last, min_params)")

    def uniform_value(self):
        return self.cfg.get(self.value_field)

    def default_params(self, model) -> dict:
        per = self.cfg.get("per_layer") or {}
        return {f"{self.dim}/{n}": per.get(n, self.uniform_value()) for n in self.candidates(model)}

    def search_space(self, model) -> dict:
        layers = {n: layer for n, layer, _ in kernel_layers(model)}
        return {f"{self.dim}/{n}": self.dimension(n, layers[n]) for n in self.candidates(model)}

    def layer_values(self, model, params: dict) -> dict:
        """{layer: value} from a search point; layers it does not mention take the config value."""
        cands = self.candidates(model)
        out = {k.split("/", 1)[1]: v for k, v in self.default_params(model).items()}
        prefix = f"{self.dim}/"
        for key, v in (params or {}).items():
            if not str(key).startswith(prefix):
                continue
            n = key[len(prefix):]
            if n not in cands:
                raise PocketFlowError(f"learner '{self.name}': parameter '{key}' names no compressible layer"
                                      f"{did_you_mean(n, cands)}")
            msg = self.check_value(v)
            if msg:
                raise PocketFlowError(f"learner '{self.name}': parameter '{key}' {msg}, got {v!r}")
            out[n] = v
        return out

    # -- prediction -----------------------------------------------------------------------------
    def predicted_reps(self, model, params, reps=None) -> dict:
        reps = dict(base_reps(model) if reps is None else reps)
        for n, v in self.layer_values(model, params).items():
            if self.active(v):
                reps[n] = self.describe(reps[n], v)
        return reps

    def predict_ratio(self, model, params, metric):
        if metric in SIZE_METRICS:  # the shipped file's size model
            return super().predict_ratio(model, params, metric)
        if metric == "latency" and self.shipped is not None:  # the graph stays: only the file type counts
            return self.shipped.same_graph_ratio(model, metric)
        return ratio_from_reps(model, self.predicted_reps(model, params), self.prepared_params(model),
                               metric, self.name)

    # -- compression ----------------------------------------------------------------------------
    def apply(self, model, params, data, budget, teacher=None, hooks=()):
        """Wrap `model` (plain or already wrapped; never modified) with this learner's transforms
        and fine-tune; returns (wrapped model, history). No `prepare`: the caller does it once."""
        values = self.layer_values(model, params)
        chosen = {n for n, v in values.items() if self.active(v)}
        wrapped = wrap_model(model, lambda n: n in chosen,
                             lambda n, layer, existing: self.make_transforms(n, layer, values[n], existing),
                             lambda n: self.output_bits(n, values[n]))
        self.before_training(wrapped, data)
        own = self.train_hooks(wrapped, values, data, budget)
        history = self.fine_tune(wrapped, data, budget, teacher=teacher, hooks=list(own) + list(hooks), params=params)
        self.finish(wrapped, values, own)
        return wrapped, history

    def compress(self, model, params, data, budget, hooks=()) -> Compressed:
        self.check(model)
        wrapped, history = self.apply(self.prepare(model), params, data, budget, teacher=model, hooks=hooks)
        return package(model, wrapped, history, {"params": dict(params or {})})

    def export_extra(self, compressed: Compressed, out_dir) -> dict:
        """The packed kernels (`export_packed`): a file exactly as large as the accounted kernels."""
        return export_packed(compressed.model, out_dir)

    # -- shared helper for subclasses -----------------------------------------------------------
    @staticmethod
    def total_steps(cfg: dict, data, budget) -> int:
        """Optimizer steps the trainer will run for `budget` (schedules are laid out on them)."""
        from pocketflow.training import budget_steps
        return budget_steps(cfg, len(data.x_train), budget.epochs, budget.steps)

