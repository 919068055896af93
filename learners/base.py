"""The Learner concept: one small abstract base every compression method implements.

A learner never sees the optimizer or the file system. The search asks it for its
`search_space`, hands it a point (`params`), lets it `project` the point onto the
target ratio, and calls `compress`; the CLI/API call `export`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from pocketflow.schema import Field, validate_section
from pocketflow.errors import ConfigError, PocketFlowError
from pocketflow.registry import Registry
from pocketflow.targets import FILE_METRICS, METRICS as _METRICS, SIZE_METRICS

LEARNERS: Registry[type["Learner"]] = Registry("learner")
METRICS = tuple(_METRICS)


def register(name: str):
    """Class decorator: `@register("weight_sparsity") class WeightSparsity(Learner): ...`"""
    def deco(cls):
        cls.name = name
        return LEARNERS.register(name)(cls)
    return deco


@dataclass
class Budget:
    """How long to fine-tune: `epochs` (may be fractional) or `steps`, plus a per-epoch callback."""
    epochs: float | None = None
    steps: int | None = None
    on_epoch_end: Callable[[int, dict], None] | None = None


@dataclass
class Compressed:
    """A learner's output.

    model:       the Keras model as trained (may hold wrapper layers: masks, fake quant).
    deploy:      a plain Keras model with the compressed weights baked in (what is exported).
    size_bytes:  exact bytes of the compressed representation (documented per learner).
    info:        per-layer ratios / bits / sparsity etc. for reports.
    history:     the fine-tuning History, if any.
    """
    model: Any
    deploy: Any
    size_bytes: int
    info: dict = field(default_factory=dict)
    history: Any = None
    nonzero_params: int | None = None


class Learner(abc.ABC):
    name: ClassVar[str] = "base"
    #: learner-specific config keys (the `learner:` section), validated by pocketflow.config
    params: ClassVar[dict[str, Field]] = {}
    #: metrics this learner can move (others raise at set-up)
    metrics: ClassVar[tuple[str, ...]] = METRICS
    #: the TFLite quantization its deployable model is meant for (None: float), unless the
    #: config's `export.quantize` says otherwise
    export_quantize: ClassVar[str | None] = None

    def __init__(self, cfg: dict, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        #: the file the run ships (pocketflow.targets.Shipped): what `size`, `download_size` and
        #: `latency` are measured and predicted on; set by the run before any check
        self.shipped = None

    def ship(self, shipped) -> None:
        """Tell the learner which file the run ships (its deploy type, calibration images, latency
        setting); a chain tells its steps."""
        self.shipped = shipped

    def shipped_for(self, params: dict):
        """The file a point ships (a method search may ship float for one method, int8 for another)."""
        return self.shipped

    # -- search ---------------------------------------------------------------------------
    @abc.abstractmethod
    def search_space(self, model) -> dict:
        """Named dimensions (hpo.space.Float/Int/Categorical), per layer where it makes sense."""

    def default_params(self, model) -> dict:
        """The point used without a search (uniform settings from the config)."""
        return {}

    def initial_points(self, model) -> list[dict]:
        """Points a new search runs first (e.g. the recipes a method search starts from); default none."""
        return []

    def prepare_search(self, model, metric: str) -> None:
        """One-off set-up a search needs before its first trial (e.g. a measurement cached per
        machine), so it is not charged to the first trial. Default: nothing."""

    def predict_ratio(self, model, params: dict, metric: str) -> float:
        """The ratio `params` will give for `metric`, computed before any training. The default
        predicts `size` / `download_size` from `predicted_reps` with the shipped file's size model."""
        if metric in SIZE_METRICS and self.shipped is not None:
            reps = self.predicted_reps(model, params)
            if reps is not None:
                return self.shipped.predict(model, reps, metric, self.sparsity_pattern())
        raise PocketFlowError(f"learner '{self.name}' cannot target metric '{metric}'")

    def sparsity_pattern(self) -> str:
        """How this learner's zeros are laid out (the size model's gzip rates depend on it)."""
        return self.cfg.get("pattern") or "unstructured"

    def predicted_reps(self, model, params: dict, reps: dict | None = None) -> dict | None:
        """How `params` will store each kernel (name -> learners.accounting.KernelRep, starting from
        `reps` when a chain hands over its earlier steps'), or None if the learner cannot say; the
        size targets are predicted from it."""
        return None

    def max_ratio(self, model, metric: str) -> float:
        """The largest ratio this learner can reach: the ratio at the most compressed point of
        `scale`'s line through the defaults (an impossible target is refused up front)."""
        return self.predict_ratio(model, self.scale(self.default_params(model), 0.0), metric)

    def check(self, model) -> None:
        """Refuse, with a one-line PocketFlowError, a model this learner cannot compress; runs
        before any training. Default: every model is accepted."""

    def check_target(self, model, metric: str, ratio: float | None) -> None:
        """The one reachability check: a metric the learner cannot move, or a target above
        `max_ratio`, is refused before any training."""
        if ratio is None:
            return
        if metric not in self.metrics:
            raise PocketFlowError(f"learner '{self.name}' cannot target metric '{metric}'; it can target: "
                                  f"{', '.join(self.metrics) or 'nothing (it does not compress)'}")
        top = self.max_ratio(model, metric)
        if ratio > top * 1.0001:
            raise PocketFlowError(f"target {metric} ratio {ratio:g}x is out of reach for learner "
                                  f"'{self.name}': its maximum on this model is {top:.2f}x")

    def scale(self, params: dict, alpha: float) -> dict:
        """A one-knob family of points through `params`: alpha=1 keeps `params`, smaller alpha
        compresses more, alpha=0 compresses most. Learners with per-layer ratios/bits implement
        it so that `project` can meet a target without knowing their insides."""
        raise PocketFlowError(f"learner '{self.name}' cannot be projected onto a target")

    def project(self, model, params: dict, metric: str, ratio: float, tol: float = 0.01) -> dict:
        """Move `params` along `scale` so predict_ratio meets `ratio` (within `tol`, or above).

        Bisection on alpha: the predicted ratio must fall as alpha grows. A point that already
        meets the target is pulled back towards it along `relax` (less compression = more
        accuracy), where the learner has that knob.
        """
        lo, hi = 0.0, 1.0
        if self.predict_ratio(model, self.scale(params, lo), metric) < ratio * (1 - 1e-9):
            raise PocketFlowError(f"target {metric} ratio {ratio:g}x is out of reach for learner "
                                  f"'{self.name}' (maximum {self.max_ratio(model, metric):.2f}x)")
        if self.predict_ratio(model, self.scale(params, hi), metric) >= ratio:
            return self._pull_back(model, params, metric, ratio)
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.predict_ratio(model, self.scale(params, mid), metric) >= ratio:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-4:
                break
        return self.scale(params, lo)

    def relax(self, params: dict, beta: float) -> dict:
        """The other direction of `scale`: beta=0 keeps `params`, beta=1 compresses least (no
        sparsity, most bits, all channels). Lets `project` pull an over-compressed point back
        to the target instead of spending accuracy on ratio nobody asked for."""
        raise PocketFlowError(f"learner '{self.name}' cannot relax a point")

    def _pull_back(self, model, params: dict, metric: str, ratio: float) -> dict:
        """The least compressed point on `relax`'s line that still meets `ratio` (bisection)."""
        try:
            if self.predict_ratio(model, self.relax(params, 1.0), metric) >= ratio:
                return self.relax(params, 1.0)
        except PocketFlowError:
            return params  # no knob: keep the point as it is
        lo, hi = 0.0, 1.0
        while hi - lo > 1e-4:
            mid = (lo + hi) / 2
            if self.predict_ratio(model, self.relax(params, mid), metric) >= ratio:
                lo = mid
            else:
                hi = mid
        return self.relax(params, lo)

    # -- compression ----------------------------------------------------------------------
    @abc.abstractmethod
    def compress(self, model, params: dict, data, budget: Budget, hooks=()) -> Compressed:
        """Compress a copy of `model` (never modify it in place) and fine-tune within `budget`."""

    def measure(self, original, compressed: Compressed, metric: str) -> float:
        """The measured ratio of a compressed candidate (after compression, exact): the file
        metrics on the converted file the run would ship (pocketflow.targets)."""
        from pocketflow import metrics as M
        if metric in FILE_METRICS:
            shipped = self.shipped
            if shipped is None:  # used outside a run: the float file
                from pocketflow.targets import Shipped
                shipped = Shipped(deploy="float", representative=None)
            return shipped.measure(original, compressed.deploy, metric)
        if metric == "packed_size":
            return M.float_bytes(original) / max(1, compressed.size_bytes)
        if metric == "flops":
            return M.count_macs(original) / max(1, M.count_macs(compressed.deploy))
        if metric == "params":
            nz = compressed.nonzero_params if compressed.nonzero_params is not None else M.count_params(compressed.deploy)
            return M.count_params(original) / max(1, nz)
        raise PocketFlowError(f"unknown metric '{metric}'")

    def export_extra(self, compressed: Compressed, out_dir) -> dict:
        """Files beyond the Keras/TFLite exports (e.g. the packed weights) written into `out_dir`;
        returns {key: {"path", "bytes", ...}} for metrics.json. Default: none."""
        return {}

    # -- shared helpers ---------------------------------------------------------------------
    def distill_space(self) -> dict:
        """Temperature and weight become search dimensions when distillation is on."""
        from pocketflow.hpo.space import Float
        if not (self.cfg.get("distill") or {}).get("enabled"):
            return {}
        return {"distill/temperature": Float(1.0, 10.0), "distill/weight": Float(0.1, 0.9)}

    def full_space(self, model) -> dict:
        """What the search explores: the learner's own dimensions plus distillation's."""
        return {**self.search_space(model), **self.distill_space()}

    def optional_space(self, model) -> dict:
        """Dimensions every learner can search when `search.space` names them (off by default:
        each one multiplies the trials a search needs)."""
        from pocketflow.hpo.space import Float
        lr = float(self.cfg["fine_tune"]["learning_rate"])
        return {"fine_tune/learning_rate": Float(lr / 10, lr * 10, log=True)}

    def fine_tune_hooks(self, teacher, params: dict | None = None) -> list:
        """Distillation from the original model, for every learner, when enabled."""
        from pocketflow.training import DistillationHook
        d = self.cfg.get("distill") or {}
        if not d.get("enabled"):
            return []
        p = params or {}
        return [DistillationHook(teacher, p.get("distill/temperature", d.get("temperature", 4.0)),
                                 p.get("distill/weight", d.get("weight", 0.5)))]

    def fine_tune(self, model, data, budget: Budget, teacher=None, hooks=(), params: dict | None = None):
        """Fine-tune with the `learner.fine_tune` section and the shared trainer."""
        from pocketflow.training import Trainer
        if not (budget.steps or budget.epochs):
            return None
        hooks = list(hooks) + (self.fine_tune_hooks(teacher, params) if teacher is not None else [])
        cfg = dict(self.cfg["fine_tune"])
        if params and "fine_tune/learning_rate" in params:  # a searched learning rate
            cfg["learning_rate"] = float(params["fine_tune/learning_rate"])
        trainer = Trainer(model, data, cfg, hooks=hooks, seed=self.seed)
        history = trainer.fit(epochs=budget.epochs, steps=budget.steps, on_epoch_end=budget.on_epoch_end)
        if cfg.get("recalibrate_bn", True):  # trials are scored, and the final model ships, with them
            from pocketflow.batchnorm import recalibrate
            recalibrate(model, data)
        return history

    @classmethod
    def validate(cls, section: dict, source: str, where: str = "learner") -> dict:
        """Validate the learner-specific keys (`where` names the section in errors, e.g.
        `learner.weight_sparsity` inside a chain); returns the section with defaults filled in."""
        base = {k: section[k] for k in ("name", "fine_tune", "distill") if k in section}
        own = {k: v for k, v in section.items() if k not in base}
        resolved = validate_section(own, cls.params, where, source)
        for k, f in cls.params.items():
            if k in resolved:
                section[k] = resolved[k]
        return section


def validate_learner_section(section: dict, source: str) -> None:
    cls = LEARNERS.get(section["name"])
    try:
        cls.validate(section, source)
    except ConfigError:
        raise
    except PocketFlowError as e:
        raise ConfigError(f"{source}: {e}") from None
