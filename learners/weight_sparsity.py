"""`weight_sparsity`: magnitude pruning raised gradually while fine-tuning (Zhu & Gupta, 2017).

Why gradual: pruning 80-90% of a trained network at once destroys it; raising the mask along
a cubic schedule lets the remaining weights take over while training continues. Masks live in
the forward pass (`MagnitudeMask` in a `KernelWrapper`), are raised by a TrainHook after the
optimizer step, and never shrink (a pruned weight scores 0), so each pruned layer ends with
exactly ceil(s * n) zeros.

Schedule (TF-MOT PolynomialDecay): at step t in [begin_step, end_step] with
(t - begin_step) % frequency == 0, sparsity = s + (s0 - s) * (1 - p)^power,
p = (t - begin_step) / (end_step - begin_step). Unlike TF-MOT the masks are also updated at
end_step itself and set to the final sparsity after fine-tuning, so the target is always met.

Patterns: unstructured, RxC blocks of the channel-by-weights matrix (e.g. 1x4: 4 consecutive
weights of one output channel), or N:M (e.g. 2:4: the 2 smallest of every 4 consecutive
weights of a channel are zero).

Size: kernels of pruned layers are stored as the smaller of a dense float32 array, a bitmap
(1 bit per weight) + float32 nonzeros, or CSR (uint16 column indexes + int32 row pointers) +
float32 nonzeros; see `accounting.storage`. The packed export writes exactly that.
"""
from __future__ import annotations

from dataclasses import replace

from pocketflow.schema import Field, in_unit, non_negative, positive
from pocketflow.errors import PocketFlowError
from pocketflow.learners.base import register
from pocketflow.learners.kernels import is_depthwise
from pocketflow.learners.transform_learner import COMMON_PARAMS, TransformLearner, per_layer_field
from pocketflow.learners.transforms import MagnitudeMask, expected_zeros, parse_pattern
from pocketflow.learners.wrap import wrappers
from pocketflow.training import TrainHook

#: the most a projection or a search pushes any layer (alpha = 0 of `scale`)
MAX_SPARSITY = 0.98


def _pattern_ok(p):
    try:
        parse_pattern(p)
    except PocketFlowError as e:
        return str(e).split(": ", 1)[1]
    return None


class PruningSchedule(TrainHook):
    """Raises every pruned layer's mask along the polynomial schedule, after optimizer steps."""

    def __init__(self, targets, initial, begin, end, frequency, power):
        self.targets = targets  # (wrapper, transform index, final sparsity)
        self.initial, self.begin, self.end = initial, begin, end
        self.frequency, self.power = frequency, power

    def sparsity(self, step: int, final: float) -> float:
        p = min(1.0, max(0.0, (step - self.begin) / max(1, self.end - self.begin)))
        s0 = min(self.initial, final)
        return final + (s0 - final) * (1 - p) ** self.power

    def due(self, step: int) -> bool:
        return self.begin <= step <= self.end and ((step - self.begin) % self.frequency == 0 or step == self.end)

    def update(self, step: int | None) -> None:
        """Masks for `step` (None: the final sparsity)."""
        for w, i, final in self.targets:
            s = final if step is None else self.sparsity(step, final)
            w.transforms[i].set_sparsity(w.kernel_input(i), s)

    def on_train_begin(self, trainer) -> None:
        if self.due(0):
            self.update(0)

    def after_step(self, step: int) -> None:
        if self.due(step):
            self.update(step)


@register("weight_sparsity")
class WeightSparsity(TransformLearner):
    """Magnitude masks raised on a schedule; per-layer sparsity is the search space."""
    metrics = ("packed_size", "params", "size", "download_size")
    dim = "sparsity"
    value_field = "sparsity"
    export_quantize = "int8"
    params = {
        "sparsity": Field(float, 0.5, check=in_unit, help="final fraction of zero weights in each pruned layer"),
        "per_layer": per_layer_field(in_unit, "sparsity"),
        "pattern": Field(str, "unstructured", check=_pattern_ok, help="unstructured | RxC blocks (1x4) | N:M (2:4)"),
        "initial_sparsity": Field(float, 0.0, check=in_unit),
        "begin_step": Field(int, 0, check=non_negative),
        "end_step": Field((int, type(None)), None, help="default: 70% of the fine-tuning steps"),
        "frequency": Field((int, type(None)), None, check=positive,
                           help="steps between mask updates (default: about 10 updates over the ramp)"),
        "power": Field(float, 3.0, check=positive),
        **COMMON_PARAMS,
    }

    @property
    def pattern(self):
        return parse_pattern(self.cfg.get("pattern") or "unstructured")

    def check_value(self, v):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "must be a number"
        return in_unit(v)

    def dimension(self, name, layer):
        from pocketflow.hpo.space import Categorical, Float
        if self.pattern[0] == "nm":
            return Categorical((0.0, self._nm_sparsity()))
        return Float(0.0, MAX_SPARSITY)

    def _nm_sparsity(self) -> float:
        _, n, m = self.pattern
        return 1 - n / m

    def active(self, value) -> bool:
        return value > 0

    def scale(self, params, alpha):
        """Density interpolated geometrically towards 1 - MAX_SPARSITY (alpha = 0); N:M layers
        that are off switch on for any alpha < 1."""
        alpha = min(1.0, max(0.0, alpha))
        out = dict(params)
        for k, s in params.items():
            if not k.startswith("sparsity/"):
                continue
            if self.pattern[0] == "nm":
                out[k] = s if alpha >= 1 or s > 0 else self._nm_sparsity()
                continue
            d = 1 - s
            d_min = min(1 - MAX_SPARSITY, d)
            out[k] = float(1 - d_min ** (1 - alpha) * d ** alpha)
        return out

    def relax(self, params, beta):
        """Sparsity shrunk towards 0 (N:M layers stay as they are: their sparsity is fixed)."""
        beta = min(1.0, max(0.0, beta))
        if self.pattern[0] == "nm":
            return dict(params)
        return {k: (float(v) * (1 - beta) if k.startswith("sparsity/") else v) for k, v in params.items()}

    def describe(self, rep, value):
        zeros = expected_zeros(rep.shape, value, self.cfg.get("pattern") or "unstructured", rep.depthwise)
        return replace(rep, zeros=zeros, sparse=True)

    def make_transforms(self, name, layer, value, existing):
        return [MagnitudeMask(self.cfg.get("pattern") or "unstructured", depthwise=is_depthwise(layer),
                              name=f"{name}_mask")]

    def _targets(self, wrapped, values):
        by_name = {w.name: w for w in wrappers(wrapped)}
        return [(by_name[n], _last_mask(by_name[n]), s) for n, s in values.items() if s > 0]

    def train_hooks(self, wrapped, values, data, budget):
        c = self.cfg
        total = self.total_steps(c["fine_tune"], data, budget)
        begin = int(c.get("begin_step") or 0)
        end = c.get("end_step")
        end = max(begin, round(0.7 * total)) if end is None else int(end)
        if end < begin:
            raise PocketFlowError(f"{self.config_key}.end_step ({end}) must be >= begin_step ({begin})")
        freq = int(c.get("frequency") or max(1, (end - begin) // 10))
        return [PruningSchedule(self._targets(wrapped, values), float(c.get("initial_sparsity") or 0.0),
                                begin, end, freq, float(c.get("power") or 3.0))]

    def finish(self, wrapped, values, hooks):
        for h in hooks:
            if isinstance(h, PruningSchedule):
                h.update(None)

    def compress(self, model, params, data, budget, hooks=()):
        comp = super().compress(model, params, data, budget, hooks)
        from pocketflow import metrics as M
        comp.info["pattern"] = self.cfg.get("pattern") or "unstructured"
        comp.info["gzip_float_weights_bytes"] = M.gzip_size(
            b"".join(w.astype("<f4").tobytes() for w in comp.deploy.get_weights()))
        return comp


def _last_mask(w) -> int:
    return max(i for i, t in enumerate(w.transforms) if isinstance(t, MagnitudeMask))
