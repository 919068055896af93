"""`chain`: learners applied in sequence, each fine-tuning on top of the previous one's result.

    learner:
      name: chain
      steps: [weight_sparsity, nonuniform_quant, uniform_quant]
      fine_tune: {epochs: 1}             # every step's default
      weight_sparsity: {sparsity: 0.8}   # a step's own settings, under its name
      uniform_quant: {bits: 8, fine_tune: {epochs: 2}}

Why stacking wrappers rather than re-running learners on exported models: a step that
received a stripped model would fine-tune the pruned zeros back to life and move clustered
weights off their codebook. Transform steps (`TransformLearner`s) instead add their transforms
to the previous step's wrapped model, so masks, codebooks and grids all stay active while the
next step trains (see `wrappers`). Graph rewrites the steps need (BatchNorm folding) run once,
before the first transform step, so later transforms never see a kernel rescaled after them.

Learners that change the architecture (e.g. `channel_pruning`) run as themselves, through the
registry, and must come before the transform steps; their deploy model is the next input.

Budget: every step gets the chain's budget scaled by its own fine_tune.epochs relative to the
chain's (1 by default). Search space: the union of the steps' spaces, each name prefixed by its
step (`weight_sparsity/sparsity/conv`). The compression ratio is that of the final
representation (e.g. sparse layout + codebook indexes); the prediction multiplies in the
ratio an architecture step predicts for its own part, which is an estimate.
"""
from __future__ import annotations

from pocketflow.schema import DISTILL, TRAIN, Field, validate_section
from pocketflow.errors import ConfigError, PocketFlowError
from pocketflow.learners.base import LEARNERS, Budget, Compressed, Learner, register
from pocketflow.learners.accounting import base_reps, export_packed, package, ratio_from_reps
from pocketflow.learners.transform_learner import TransformLearner
from pocketflow.learners.wrap import wrappers
from pocketflow.targets import SIZE_METRICS
from pocketflow.registry import did_you_mean

_BASE_KEYS = ("name", "fine_tune", "distill")
SHARED_SECTIONS = ("fine_tune", "distill")  # point keys a chain hands to every step


def _resolved(sub, name) -> bool:
    return isinstance(sub, dict) and sub.get("name") == name and "batch_size" in (sub.get("fine_tune") or {})


def _is_transform(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, TransformLearner)


@register("chain")
class Chain(Learner):
    """Several learners in sequence; see the module docstring."""
    params = {"steps": Field(list, None, required=True, help="learner names, applied in order")}

    # -- config ---------------------------------------------------------------------------------
    @classmethod
    def validate(cls, section: dict, source: str, where: str = "learner") -> dict:
        """Check `steps` and each step's nested settings (with the step learner's own schema);
        stores each step's resolved section (name, fine_tune, distill, own keys) under its name."""
        steps = section.get("steps")
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise ConfigError(f"{source}: 'learner.steps' must be a non-empty list of learner names, got {steps!r}")
        names = [n for n in LEARNERS.names() if n != "chain"]
        for s in steps:
            if s == "chain":
                raise ConfigError(f"{source}: 'learner.steps' cannot contain 'chain' itself")
            if s not in LEARNERS:
                raise ConfigError(f"{source}: 'learner.steps' has unknown learner {s!r}{did_you_mean(s, names)}; "
                                  f"choose from: {', '.join(names)}")
        if len(set(steps)) != len(steps):
            raise ConfigError(f"{source}: 'learner.steps' lists a learner twice: {steps}")
        for key in section:
            if key not in _BASE_KEYS and key != "steps" and key not in steps:
                raise ConfigError(f"{source}: unknown key 'learner.{key}'{did_you_mean(key, steps + ['steps'])}; "
                                  "a step's settings go under its name, which must be listed in learner.steps")
        seen_transform = None
        for s in steps:
            if _is_transform(LEARNERS.get(s)):
                seen_transform = seen_transform or s
            elif seen_transform:
                raise ConfigError(f"{source}: 'learner.steps': '{s}' must come before '{seen_transform}' "
                                  "(steps that change the architecture run before weight-transform steps)")
        ft = section.get("fine_tune") or validate_section({}, TRAIN, "learner.fine_tune", source)
        distill = section.get("distill") or validate_section({}, DISTILL, "learner.distill", source)
        for s in steps:
            raw = section.get(s) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{source}: 'learner.{s}' must be a mapping of {s} settings, got {raw!r}")
            for k, base in (("fine_tune", ft), ("distill", distill)):
                if not isinstance(raw.get(k) or {}, dict):
                    raise ConfigError(f"{source}: 'learner.{s}.{k}' must be a mapping")
            sub = {"name": s,
                   "fine_tune": validate_section({**ft, **(raw.get("fine_tune") or {})}, TRAIN,
                                                 f"learner.{s}.fine_tune", source),
                   "distill": validate_section({**distill, **(raw.get("distill") or {})}, DISTILL,
                                               f"learner.{s}.distill", source)}
            own = {k: v for k, v in raw.items() if k not in _BASE_KEYS}
            sub = LEARNERS.get(s).validate({**sub, **own}, source, where=f"learner.{s}")
            section[s] = sub
        return section

    def __init__(self, cfg: dict, seed: int = 0):
        super().__init__(cfg, seed)
        if not all(_resolved(cfg.get(s), s) for s in cfg.get("steps") or ()):
            self.validate(cfg, "<chain>")
        self.steps: list[tuple[str, Learner]] = []
        for s in cfg["steps"]:
            learner = LEARNERS.get(s)(cfg[s], seed)
            learner.config_key = f"learner.{s}"
            self.steps.append((s, learner))
        self.metrics = tuple(sorted({m for _, step in self.steps for m in step.metrics}))
        if any(step.export_quantize == "int8" for _, step in self.steps):
            self.export_quantize = "int8"

    # -- search ---------------------------------------------------------------------------------
    def check(self, model) -> None:
        for _, step in self.steps:
            step.check(model)

    def search_space(self, model) -> dict:
        return {f"{n}/{k}": d for n, step in self.steps for k, d in step.search_space(model).items()}

    def full_space(self, model) -> dict:
        """Each step's own dimensions and its distillation's, under the step's name."""
        return {f"{n}/{k}": d for n, step in self.steps for k, d in step.full_space(model).items()}

    def optional_space(self, model) -> dict:
        """One learning rate for every step (`fine_tune/learning_rate`) or one per step
        (`weight_sparsity/fine_tune/learning_rate`, ...): hand recipes tune them per step."""
        own = super().optional_space(model)
        return {**own, **{f"{n}/{k}": d for n, step in self.steps for k, d in step.optional_space(model).items()}}

    def default_params(self, model) -> dict:
        return {f"{n}/{k}": v for n, step in self.steps for k, v in step.default_params(model).items()}

    def sparsity_pattern(self) -> str:
        return next((s.sparsity_pattern() for _, s in self.steps if s.cfg.get("pattern")), "unstructured")

    def ship(self, shipped) -> None:
        super().ship(shipped)
        for _, step in self.steps:
            step.ship(shipped)

    def prepare_search(self, model, metric: str) -> None:
        if self.steps:  # the first step sees the original model (channel pruning comes first)
            self.steps[0][1].prepare_search(model, metric)

    def split(self, params: dict) -> dict[str, dict]:
        """{'weight_sparsity/sparsity/conv': .8} -> {'weight_sparsity': {'sparsity/conv': .8}, ...}.
        A shared key without a step name (`fine_tune/...`, `distill/...`) goes to every step that
        has no value of its own for it."""
        out, shared = {n: {} for n, _ in self.steps}, {}
        for key, v in (params or {}).items():
            step, _, rest = str(key).partition("/")
            if step in SHARED_SECTIONS and step not in out:
                shared[key] = v
                continue
            if step not in out or not rest:
                raise PocketFlowError(f"learner 'chain': parameter '{key}' belongs to no step; prefix it with "
                                      f"one of: {', '.join(out)}")
            out[step][rest] = v
        for part in out.values():
            for key, v in shared.items():
                part.setdefault(key, v)
        return out

    def _join(self, parts: dict) -> dict:
        return {f"{n}/{k}": v for n, p in parts.items() for k, v in p.items()}

    def _each_step(self, params, knob: str, value):
        """Turn the same knob (scale or relax) of every step; a step without it keeps its point."""
        parts = self.split(params)
        for n, step in self.steps:
            try:
                parts[n] = getattr(step, knob)(parts[n], value)
            except PocketFlowError:
                pass
        return self._join(parts)

    def scale(self, params, alpha):
        return self._each_step(params, "scale", alpha)

    def relax(self, params, beta):
        return self._each_step(params, "relax", beta)

    def predicted_reps(self, model, params, reps=None):
        """Each step describes the kernels the earlier steps left (pruned shapes, then zeros, then
        bits); None if a step cannot say."""
        parts = self.split(params)
        for n, step in self.steps:
            reps = step.predicted_reps(model, parts[n], reps)
            if reps is None:
                return None
        return reps

    def predict_ratio(self, model, params, metric):
        from pocketflow.metrics import count_params
        if metric in SIZE_METRICS:  # the shipped file's size model, on every step's kernels
            return super().predict_ratio(model, params, metric)
        parts, ratio, moved = self.split(params), 1.0, False
        transforms = [(n, s) for n, s in self.steps if isinstance(s, TransformLearner)]
        for n, step in self.steps:
            if not isinstance(step, TransformLearner):
                try:
                    ratio *= step.predict_ratio(model, parts[n], metric)
                    moved = True
                except PocketFlowError:
                    pass
        if metric == "latency" and transforms and self.shipped is not None:
            # a structural step's prediction already times the shipped file type; the transforms
            # keep the graph, so alone they get the file type's own speed-up
            return ratio if moved else self.shipped.same_graph_ratio(model, metric)
        if transforms:
            reps, n_params = base_reps(model), count_params(model)
            for n, step in transforms:
                reps = step.predicted_reps(model, parts[n], reps)
                n_params -= count_params(model) - step.prepared_params(model)
            try:
                ratio *= ratio_from_reps(model, reps, n_params, metric, "chain")
                moved = True
            except PocketFlowError:
                pass
        if not moved:
            raise PocketFlowError(f"learner 'chain' cannot target metric '{metric}'")
        return ratio

    # -- compression ----------------------------------------------------------------------------
    def _budget(self, name: str, budget: Budget, last: bool) -> Budget:
        mine, step = self.cfg["fine_tune"], self.cfg[name]["fine_tune"]
        if budget.steps and mine.get("steps") and step.get("steps"):
            w = step["steps"] / mine["steps"]
        else:
            w = step["epochs"] / mine["epochs"] if mine["epochs"] else 1.0
        return Budget(epochs=budget.epochs * w if budget.epochs is not None else None,
                      steps=max(1, round(budget.steps * w)) if budget.steps else budget.steps,
                      on_epoch_end=budget.on_epoch_end if last else None)

    def compress(self, model, params, data, budget: Budget, hooks=()) -> Compressed:
        self.check(model)
        parts = self.split(params)
        cur, history, last, prepared, infos = model, None, None, False, {}
        for i, (n, step) in enumerate(self.steps):
            b = self._budget(n, budget, i == len(self.steps) - 1)
            if isinstance(step, TransformLearner):
                if not prepared:
                    for _, later in self.steps[i:]:
                        cur = later.prepare(cur)
                    prepared = True
                cur, history = step.apply(cur, parts[n], data, b, teacher=model, hooks=hooks)
            else:
                last = step.compress(cur, parts[n], data, b, hooks=hooks)
                cur, history, infos[n] = last.deploy, last.history, last.info
        if not prepared:
            return last
        return package(model, cur, history, {"params": dict(params or {}), "steps": [n for n, _ in self.steps],
                                             "step_info": infos})

    def export_extra(self, compressed: Compressed, out_dir) -> dict:
        if wrappers(compressed.model):
            return export_packed(compressed.model, out_dir)
        return self.steps[-1][1].export_extra(compressed, out_dir)
