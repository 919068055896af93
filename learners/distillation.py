"""`distillation`: train a smaller zoo model (the student) from the user's model (the teacher).

Loss = task loss + weight · T² · KL(teacher_T ‖ student_T) (Hinton et al. 2015), through the
same DistillationHook every other learner uses when `distill.enabled` is set.
"""
from __future__ import annotations

from pocketflow.schema import Field
from pocketflow.errors import PocketFlowError
from pocketflow.learners.base import Budget, Compressed, Learner, register


def _unit_interval(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


@register("distillation")
class Distillation(Learner):
    params = {
        "student": Field(str, "seed_cnn", help="zoo model name of the student"),
        "student_args": Field(dict, {}, open=True, help="builder arguments, e.g. {alpha: 0.5}"),
        "width": Field((str, type(None)), None, help="name of the student builder's width argument "
                       "(e.g. alpha) to search over; its value is the 'width' dimension"),
        "min_width": Field(float, 0.25, check=_unit_interval),
    }
    metrics = ("packed_size", "flops", "params")

    def _student(self, model, params: dict):
        from pocketflow.zoo import build_model
        args = dict(self.cfg.get("student_args") or {})
        if self.cfg.get("width") and "width" in params:
            args[self.cfg["width"]] = float(params["width"])
        return build_model(self.cfg["student"], model.input_shape[1:], int(model.output_shape[-1]), args)

    def search_space(self, model) -> dict:
        from pocketflow.hpo.space import Float
        space = {"fine_tune/learning_rate": Float(1e-4, 1e-2, log=True)}  # a student from scratch
        if self.cfg.get("width"):
            space["width"] = Float(self.cfg["min_width"], 1.0)
        # temperature and weight are always searched here: distillation is the whole method
        return {**space, "distill/temperature": Float(1.0, 10.0), "distill/weight": Float(0.1, 0.9)}

    def distill_space(self) -> dict:
        return {}  # already part of search_space

    def default_params(self, model) -> dict:
        d = self.cfg["distill"]
        p = {"distill/temperature": d["temperature"], "distill/weight": d["weight"]}
        if self.cfg.get("width"):
            p["width"] = float((self.cfg.get("student_args") or {}).get(self.cfg["width"], 1.0))
        return p

    def scale(self, params: dict, alpha: float) -> dict:
        if not self.cfg.get("width"):
            return dict(params)
        lo = self.cfg["min_width"]
        return {**params, "width": lo + (params.get("width", 1.0) - lo) * alpha}

    def predict_ratio(self, model, params, metric):
        from pocketflow import metrics as M
        student = self._student(model, params)
        fn = {"packed_size": M.float_bytes, "params": M.count_params, "flops": M.count_macs}.get(metric)
        if fn is None:
            raise PocketFlowError(f"learner 'distillation' cannot target metric '{metric}'")
        return fn(model) / max(1, fn(student))

    def compress(self, model, params, data, budget: Budget, hooks=()) -> Compressed:
        import keras

        from pocketflow import metrics as M
        from pocketflow.training import DistillationHook, Trainer
        student = self._student(model, params)
        d = self.cfg["distill"]
        hook = DistillationHook(model, params.get("distill/temperature", d["temperature"]),
                                params.get("distill/weight", d["weight"]))
        ft = dict(self.cfg["fine_tune"])
        if "fine_tune/learning_rate" in params:
            ft["learning_rate"] = float(params["fine_tune/learning_rate"])
        keras.utils.set_random_seed(self.seed)
        hist = None
        if budget.steps or budget.epochs:
            hist = Trainer(student, data, ft, hooks=[hook, *hooks], seed=self.seed).fit(
                epochs=budget.epochs, steps=budget.steps, on_epoch_end=budget.on_epoch_end)
        return Compressed(model=student, deploy=student, size_bytes=M.float_bytes(student), history=hist,
                          info={"student": self.cfg["student"], "student_params": M.count_params(student)})
