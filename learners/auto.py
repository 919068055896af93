"""`learner: auto`: a search over compression methods, not only over one method's settings.

A method is a chain of learners (`weight_sparsity -> nonuniform_quant -> uniform_quant`). The
search space is a categorical `method` plus every method's own dimensions under its name (a flat
encoding: GP and TPE both take it; a trial uses its method's dimensions and ignores the rest),
including each step's fine-tune learning rate, which the hand recipes tune per step. The first
trials are the methods' default points (the recipes), so the search starts where a careful
engineer would and spends the rest of its budget improving on them.

Which methods a target calls for (`METHODS`), and why:
- `flops`: prune channels (the only method that removes multiply-accumulates).
- `latency`: prune channels, ship int8, or both. Whether int8 kernels run faster than float ones
  depends on the CPU (4x faster on a Xeon with AVX-512 VNNI, 0.8x on an AMD EPYC without it), so
  it is measured on the baseline's own files before the search: where int8 is slower, the int8
  methods are dropped with a notice; where faster, all three are searched, each projected with
  its own file type's latency table.
- `size` (the shipped file's raw bytes): a dense TFLite buffer stores every zero and int8 stores a
  byte per weight whatever the bits, so only fewer channels and int8 shrink it.
- `download_size` / `packed_size`: zeros and few distinct values also compress, so sparsity
  then int8, with or without clustering in between, or channels first.
- `params`: sparsity only (fewer bits do not lower a parameter count).

Defaults that made the hand recipes win (scripts/benchmarks/seed_table.py): each later step
fine-tunes at half the previous step's learning rate (a QAT step at a quarter of the base rate at
most: `QAT_LR`), the budget is split (the first step gets
half, the others share the rest: a three-step method costs what a one-step method costs), and
sparsity and clustering leave the first kernel layer alone (`skip_first`: it is tiny and every
later layer depends on it; prune 0.8 -> cluster 16 -> int8 lost 1.6 pt more without it).
A user's own per-step settings (`learner.<step>: {...}`) override these for every method.
"""
from __future__ import annotations

import copy

from pocketflow.errors import ConfigError, PocketFlowError
from pocketflow.learners.base import LEARNERS, Budget, Compressed, Learner, register
from pocketflow.schema import Field

METHODS = {
    "flops": [["channel_pruning"]],
    "latency": [["channel_pruning"], ["uniform_quant"], ["channel_pruning", "uniform_quant"]],
    "size": [["channel_pruning", "uniform_quant"], ["uniform_quant"]],
    "download_size": [["weight_sparsity", "uniform_quant"],
                      ["weight_sparsity", "nonuniform_quant", "uniform_quant"],
                      ["channel_pruning", "weight_sparsity", "uniform_quant"]],
    "packed_size": [["weight_sparsity", "uniform_quant"],
                    ["weight_sparsity", "nonuniform_quant", "uniform_quant"]],
    "params": [["weight_sparsity"]],
}
LR_DECAY = 0.5     # each later step's learning rate, relative to the previous step's
PROTECT_FIRST = ("weight_sparsity", "nonuniform_quant")  # steps that default to skip_first
FIRST_SHARE = 0.5  # the first step's share of the fine-tune budget in a multi-step method
#: a QAT step's learning rate at most this share of the base one: BatchNorm is folded into its
#: kernels, and without BN's normalization the same rate moves them much further (ResNet-20, SGD
#: 0.01 with distillation: NaN after 7 steps; 0.005 and 0.0025 trained). A third step is there already.
QAT_LR = 0.25


def method_name(steps) -> str:
    return "+".join(steps)


def default_methods(metric: str) -> list[list[str]]:
    """The methods `learner: auto` searches for `metric` (those whose learners are all installed)."""
    if metric not in METHODS:
        raise PocketFlowError(f"learner: auto has no methods for target metric '{metric}'; "
                              f"choose from: {', '.join(METHODS)}")
    found = [list(m) for m in METHODS[metric] if all(s in LEARNERS for s in m)]
    if not found:
        raise PocketFlowError(f"learner: auto for target metric '{metric}' needs "
                              + " or ".join(method_name(m) for m in METHODS[metric]) + ", none of which is installed")
    return found


def resolve_auto(section: dict, metric: str) -> tuple[dict, str | None]:
    """A raw `learner: auto` section with its `methods` filled in from the target metric (unless
    given), and the line that says what was decided."""
    if not isinstance(section, dict) or section.get("name") != "auto":
        return section, None
    if section.get("methods") is not None or not isinstance(metric, str) or metric not in METHODS:
        return section, None  # given, or a bad metric (the target section's check names it)
    section = {**section, "methods": default_methods(metric)}
    return section, (f"learner: auto searches {len(section['methods'])} method(s) for a {metric} target: "
                     + " | ".join(method_name(m) for m in section["methods"]))


def _recipe(section: dict, steps: list[str]) -> dict:
    """The chain section of one method: the user's shared keys and per-step sections, plus the
    recipe defaults (per-step learning rate and budget share) wherever the user set none."""
    ft = dict(section.get("fine_tune") or {})
    lr = float(ft.get("learning_rate", 1e-3))
    epochs = ft.get("epochs")
    chain = {"name": "chain", "steps": list(steps), **{k: copy.deepcopy(section[k]) for k in ("fine_tune", "distill")
                                                         if k in section}}
    for i, s in enumerate(steps):
        own = copy.deepcopy(section.get(s) or {})
        if not isinstance(own, dict):
            raise ConfigError(f"'learner.{s}' must be a mapping of {s} settings, got {own!r}")
        step_ft = dict(own.get("fine_tune") or {})
        step_ft.setdefault("learning_rate", lr * min(LR_DECAY ** i, QAT_LR if s == "uniform_quant" else 1.0))
        if len(steps) > 1 and epochs is not None:
            share = FIRST_SHARE if i == 0 else (1 - FIRST_SHARE) / (len(steps) - 1)
            step_ft.setdefault("epochs", float(epochs) * share)
        own["fine_tune"] = step_ft
        if s in PROTECT_FIRST:
            own.setdefault("skip_first", True)
        chain[s] = own
    return chain


@register("auto")
class Auto(Learner):
    """Searches which method (chain of learners) runs and its settings; see the module docstring."""
    params = {"methods": Field(list, None, help="learner lists to search over; default: by target metric")}

    @classmethod
    def validate(cls, section: dict, source: str, where: str = "learner") -> dict:
        from pocketflow.learners.chain import Chain
        methods = section.get("methods")
        if not (isinstance(methods, list) and methods and all(isinstance(m, list) and m for m in methods)):
            raise ConfigError(f"{source}: '{where}.methods' must be a non-empty list of learner lists, got {methods!r}")
        names = [method_name(m) for m in methods]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: '{where}.methods' lists a method twice: {names}")
        steps = {s for m in methods for s in m}
        for key in section:
            if key not in ("name", "methods", "fine_tune", "distill", "resolved") and key not in steps:
                raise ConfigError(f"{source}: unknown key '{where}.{key}': a step's settings go under its name, "
                                  f"which must appear in {where}.methods")
        resolved = {}
        for m, name in zip(methods, names):
            try:
                resolved[name] = Chain.validate(_recipe(section, m), source, where)
            except ConfigError as e:
                raise ConfigError(f"{e} (in method {name})") from None
        section["resolved"] = resolved
        return section

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__(cfg, seed)
        from pocketflow.learners.chain import Chain
        if "resolved" not in cfg:
            self.validate(cfg, "<auto>")
        self.methods = {name: Chain(sub, seed) for name, sub in cfg["resolved"].items()}
        deploys = {c.export_quantize for c in self.methods.values()}
        self.export_quantize = deploys.pop() if len(deploys) == 1 else None  # else: per method (shipped_for)
        self.metrics = tuple(sorted(set.intersection(*(set(c.metrics) for c in self.methods.values()))))

    # -- the point: method + that method's own keys ----------------------------------------------
    def split(self, params: dict) -> tuple[str, object, dict]:
        name = params.get("method", next(iter(self.methods)))
        if name not in self.methods:
            raise PocketFlowError(f"learner 'auto': unknown method {name!r}; choose from: {', '.join(self.methods)}")
        prefix = name + "/"
        return name, self.methods[name], {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}

    @staticmethod
    def join(name: str, own: dict) -> dict:
        return {"method": name, **{f"{name}/{k}": v for k, v in own.items()}}

    def _each(self, params, fn):
        name, chain, own = self.split(params)
        return self.join(name, fn(chain, own))

    # -- search -------------------------------------------------------------------------------
    def ship(self, shipped) -> None:
        """Each method ships its own file type (float, or int8 after uniform_quant) unless
        `export.quantize` fixes one for the run."""
        super().ship(shipped)
        for chain in self.methods.values():
            chain.ship(shipped.with_deploy(chain.export_quantize))

    def shipped_for(self, params: dict):
        return self.split(params)[1].shipped

    def check(self, model) -> None:
        for chain in self.methods.values():
            chain.check(model)

    def search_space(self, model) -> dict:
        from pocketflow.hpo.space import Categorical
        space = {"method": Categorical(list(self.methods))}
        for name, chain in self.methods.items():
            per_step_lr = {k: d for k, d in chain.optional_space(model).items() if k.count("/") == 2}
            space.update({f"{name}/{k}": d for k, d in {**chain.full_space(model), **per_step_lr}.items()})
        return space

    def full_space(self, model) -> dict:
        return self.search_space(model)  # each method's distillation dimensions are in its own space

    def optional_space(self, model) -> dict:
        return {}

    def default_params(self, model) -> dict:
        name, chain = next(iter(self.methods.items()))
        return self.join(name, chain.default_params(model))

    def initial_points(self, model) -> list[dict]:
        """Each method's default point: the recipes the search starts from."""
        return [self.join(n, c.default_params(model)) for n, c in self.methods.items()]

    def prepare_search(self, model, metric: str) -> None:
        for chain in self.methods.values():
            chain.prepare_search(model, metric)

    def check_target(self, model, metric: str, ratio: float | None) -> None:
        """Methods that cannot reach the target are dropped, with a notice (no trial is spent on
        them); refused only if none can."""
        if ratio is not None and metric == "latency":
            self._drop(self._slower_file_types(model))
        super().check_target(model, metric, ratio)
        if ratio is None:
            return
        self._drop({n: f"cannot reach {metric} {ratio:g}x (maximum "
                       + (f"{c.max_ratio(model, metric):.2f}x)" if metric in c.metrics else "none)")
                    for n, c in self.methods.items()
                    if metric not in c.metrics or c.max_ratio(model, metric) < ratio * 0.9999})

    def _slower_file_types(self, model) -> dict:
        """Methods whose file type runs the unchanged model slower than a float file does, while a
        float method is searched too: at any pruning they are slower than the float method at the
        same pruning (measured on this machine, once per model)."""
        if not any(c.shipped is None or c.shipped.deploy == "float" for c in self.methods.values()):
            return {}
        out = {}
        for n, c in self.methods.items():
            if c.shipped is not None and c.shipped.deploy != "float":
                speed = c.shipped.same_graph_ratio(model, "latency")
                if speed < 1.0:
                    out[n] = (f"ships {c.shipped.file}, which runs this model at {speed:.2f}x the float file's "
                              f"speed on this machine (batch {c.shipped.batch}, {c.shipped.threads} thread(s))")
        return out

    def _drop(self, reasons: dict) -> None:
        """Leave out methods (with a notice each), never all of them: the reachability check of
        the rest refuses the target in one line if none can meet it."""
        from pocketflow.distributed import world
        if not reasons or len(reasons) == len(self.methods):
            return
        for n, why in reasons.items():
            if world().is_root:
                print(f"learner: auto: method {n} {why}; not searched", flush=True)
            del self.methods[n]

    def max_ratio(self, model, metric: str) -> float:
        return max(c.max_ratio(model, metric) for c in self.methods.values() if metric in c.metrics)

    def predict_ratio(self, model, params, metric):
        name, chain, own = self.split(params)
        return chain.predict_ratio(model, own, metric)

    def predicted_reps(self, model, params, reps=None):
        name, chain, own = self.split(params)
        return chain.predicted_reps(model, own, reps)

    def project(self, model, params, metric, ratio, tol=0.01):
        name, chain, own = self.split(params)
        if metric not in chain.metrics:
            raise PocketFlowError(f"method {name} cannot target metric '{metric}'")
        return self.join(name, chain.project(model, own, metric, ratio, tol))

    def scale(self, params, alpha):
        return self._each(params, lambda c, p: c.scale(p, alpha))

    def relax(self, params, beta):
        return self._each(params, lambda c, p: c.relax(p, beta))

    # -- compression ----------------------------------------------------------------------------
    def compress(self, model, params, data, budget: Budget, hooks=()) -> Compressed:
        name, chain, own = self.split(params)
        comp = chain.compress(model, own, data, budget, hooks=hooks)
        comp.info = {**(comp.info or {}), "method": name}
        return comp

    def export_extra(self, compressed: Compressed, out_dir) -> dict:
        return self.methods[compressed.info["method"]].export_extra(compressed, out_dir)

    def measure(self, original, compressed: Compressed, metric: str) -> float:
        return self.methods[compressed.info["method"]].measure(original, compressed, metric)
