"""The ranking stage a trial can run before its fine-tune (`search.rank`): a cheap score first, so a
point that ranks poorly against the trials before it is pruned before the fine-tune is paid for
(successive halving in spirit: one cheap rung, then the full budget for the better share).

Stages (`search.rank.stage`):
  none       no ranking stage (the default: see docs/benchmarks/fidelity.md for why).
  zero_shot  the compressed deploy model with no fine-tune (`Budget(epochs=0)`; a chain skips every
             step's fine-tune), its BatchNorm moving statistics re-estimated on a few training
             batches: pruning or masking changes what every BN layer sees, and statistics of the
             original network can make a good candidate look broken. Seconds per candidate.
  short      the same after `rank.fraction` of the trial's fine-tune (e.g. 0.1 epoch).

The score is the validation accuracy on a fixed subset (`rank.images`), recorded with its seconds
in the trial (`user_attrs["stages"]`, the fine-tune stage appended after it) and reported to the
Optuna pruner at step 0, its own step (the fine-tune's epochs report at 1, 2, ...).
"""
from __future__ import annotations

import time

import numpy as np

from pocketflow.batchnorm import BN_IMAGES, batchnorms, own_copy, reestimate_bn  # noqa: F401 (re-exported)
from pocketflow.hpo.study import holds_slot

STAGES = ("none", "zero_shot", "short")
RANK_STEP = 0        # the ranking score's step in the trial's intermediate values


# -- one candidate's score ------------------------------------------------------------------------------
def stage_budget(stage: str, cfg: dict, trial_epochs: float | None, trial_steps: int | None):
    """The fine-tune a stage gives its candidate: none for zero_shot, `fraction` of the trial's for short."""
    from pocketflow.learners import Budget
    if stage == "zero_shot":
        return Budget(epochs=0)
    f = float(cfg["fraction"])
    return Budget(epochs=trial_epochs * f if trial_epochs else None,
                  steps=max(1, round(trial_steps * f)) if trial_steps else None)


def score(learner, model, params: dict, data, budget, images: int, bn: bool = True) -> dict:
    """Compress `model` at `params` within `budget`, re-estimate BN (when `bn` and the deploy model
    has BN layers; quantized chains fold them away) and score the deploy model's accuracy on the
    first `images` validation images: {val_acc, seconds, bn_layers}."""
    from pocketflow import metrics as M
    t0 = time.perf_counter()
    comp = learner.compress(model, params, data, budget)
    deploy, n_bn = comp.deploy, 0
    if bn and batchnorms(deploy):
        deploy = own_copy(deploy, model)
        n_bn = reestimate_bn(deploy, data.representative(BN_IMAGES))
    acc = M.accuracy(deploy, data.x_val[:images], data.y_val[:images])
    return {"val_acc": float(acc), "seconds": time.perf_counter() - t0, "bn_layers": n_bn}


# -- the decision ---------------------------------------------------------------------------------------
def rank_score(t, stage: str) -> float | None:
    """A trial's ranking score at `stage`, if it has one."""
    stages = t.user_attrs.get("stages") or []
    return stages[0]["val_acc"] if stages and stages[0].get("stage") == stage else None


def verdict(trials, trial, value: float, stage: str, keep: float, warmup: int) -> str | None:
    """Why `trial` (score `value`) is pruned before its fine-tune, or None: it ranks below the
    `keep` quantile of the other trials' ranking scores, once `warmup` of them are ranked. A point
    the search enqueued first (a recipe, `initial`) always goes on to its fine-tune."""
    if trial.user_attrs.get("initial") or keep >= 1:
        return None
    others = [s for t in trials if t.number != trial.number and holds_slot(t)
              and (s := rank_score(t, stage)) is not None]
    if len(others) < max(1, warmup):
        return None
    bar = float(np.quantile(others, 1.0 - keep))
    if value >= bar:
        return None
    return f"by rank: {stage} val_acc {value:.4f} below {bar:.4f}, the top-{keep:.0%} bar of {len(others)} ranked trials"


# -- the search's side ----------------------------------------------------------------------------------
class Ranker:
    """The ranking stage inside a Search (`gate` before the fine-tune, `finish` after it); every
    rank scores (a short stage fine-tunes data-parallel), rank 0 records and decides."""

    def __init__(self, search):
        self.search, self.cfg = search, search.cfg["rank"]
        self.stage = self.cfg["stage"]

    def gate(self, params: dict) -> float:
        """Run the stage for the current trial; raises optuna.TrialPruned when it ranks out.
        Returns the time the fine-tune starts (perf_counter)."""
        if self.stage == "none":
            return time.perf_counter()
        import optuna
        s = self.search
        budget = stage_budget(self.stage, self.cfg, s.cfg["trial_epochs"], s.cfg["trial_steps"])
        r = score(s.learner, s.model, params, s.ctx.data, budget, int(self.cfg["images"]))
        why = None
        if s.world.is_root:
            t = s.trial
            t.set_user_attr("stages", [{"stage": self.stage, "val_acc": r["val_acc"], "seconds": r["seconds"],
                                        **({"epochs": budget.epochs} if budget.epochs else {}),
                                        **({"steps": budget.steps} if budget.steps else {})}])
            t.report(r["val_acc"], RANK_STEP)
            why = verdict(s.study.get_trials(deepcopy=False), t, r["val_acc"], self.stage,
                          float(self.cfg["keep"]), int(self.cfg["warmup"]))
            if why:
                t.set_user_attr("pruned_by", "rank")
        why = s.world.broadcast_object(why)
        if why:
            raise optuna.TrialPruned(why)
        return time.perf_counter()

    def finish(self, acc: float, seconds: float) -> None:
        """Append the fine-tune stage to the trial's stages (rank 0)."""
        t = self.search.trial
        if self.stage == "none" or "stages" not in t.user_attrs:
            return
        c = self.search.cfg
        ft = {"stage": "fine_tune", "val_acc": float(acc), "seconds": seconds,
              **({"steps": c["trial_steps"]} if c["trial_steps"] else {"epochs": c["trial_epochs"]})}
        t.set_user_attr("stages", [*t.user_attrs["stages"], ft])

    def summary(self, trials) -> dict:
        """The search summary's `rank` entry ({} when off), also logged as one line."""
        if self.stage == "none":
            return {}
        ranked = [t for t in trials if holds_slot(t) and rank_score(t, self.stage) is not None]
        out = [t for t in ranked if t.user_attrs.get("pruned_by") == "rank"]
        secs = [t.user_attrs["stages"][0]["seconds"] for t in ranked]
        info = {"stage": self.stage, "keep": self.cfg["keep"], "warmup": self.cfg["warmup"],
                "ranked": len(ranked), "pruned_by_rank": len(out),
                "rank_seconds_mean": float(np.mean(secs)) if secs else None}
        self.search._log(f"search: rank stage {self.stage}: {len(ranked)} trial(s) ranked"
                         + (f" ({info['rank_seconds_mean']:.1f}s each)" if secs else "")
                         + f", {len(out)} pruned before their fine-tune")
        return {"rank": info}
