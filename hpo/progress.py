"""What a search tells its user: a line per trial, where the time went, and the summary that
lands in metrics.json. Read from the study, so every worker reports the same numbers."""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

from pocketflow.hpo.study import best_trial, holds_slot, is_feasible, is_finished, is_void, state


@dataclass
class Clock:
    """Where one worker's search time goes. Overhead = wall time less training, evaluation and
    waiting for other workers; `parts` names where it went (study I/O, optimizer, projection)."""
    start: float = field(default_factory=time.perf_counter)
    train_s: float = 0.0
    eval_s: float = 0.0
    wait_s: float = 0.0
    parts: Counter = field(default_factory=Counter)

    @contextlib.contextmanager
    def timed(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] += time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def account(self) -> dict:
        wall = self.elapsed()
        overhead = max(0.0, wall - self.train_s - self.eval_s - self.wait_s)
        parts = {k: round(v, 3) for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1])}
        parts["other"] = round(max(0.0, overhead - sum(self.parts.values())), 3)
        return {"wall_seconds": wall, "trial_train_seconds": self.train_s, "trial_eval_seconds": self.eval_s,
                "wait_seconds": self.wait_s, "search_overhead_seconds": overhead,
                "search_overhead_share": overhead / wall if wall else 0.0, "search_overhead_parts": parts}


def trial_line(trials, number: int, budget: int, metric: str) -> str:
    """`trial 3 [4/20] complete: val_acc 0.9012, size 4.01x (model_int8.tflite; predicted 4.03x) (12.3s)
    | best 0.9050 (trial 1)`"""
    t = trials[number]
    done = sum(1 for x in trials if holds_slot(x) and is_finished(x))
    best = best_trial(trials)
    method = t.params.get("method")
    if t.state == state("COMPLETE"):
        what = (f"[{method}] " if method else "") + f"val_acc {t.values[0]:.4f}"
        if "ratio" in t.user_attrs:
            a = t.user_attrs
            notes = [a["file"]] if a.get("file") else []
            if a.get("predicted_ratio") is not None:
                notes.append(f"predicted {a['predicted_ratio']:.2f}x")
            what += (f", {metric} {a['ratio']:.2f}x" + (f" ({'; '.join(notes)})" if notes else "")
                     + ("" if is_feasible(t) else " (misses the target)"))
        if rank := (t.user_attrs.get("stages") or [None])[0]:  # search.rank: the cheap score before
            what += f"; ranked {rank['val_acc']:.4f} {rank['stage']} ({rank['seconds']:.1f}s)"
    else:
        what = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or ""
    secs = t.user_attrs.get("seconds")
    return (f"trial {number} [{done}/{budget}] {t.state.name.lower()}: {what}"
            + (f" ({secs:.1f}s)" if secs is not None else "")
            + (f" | best {best.values[0]:.4f} (trial {best.number})" if best else " | no feasible trial yet"))


def no_result(trials, metric: str, ratio: float | None) -> str:
    """Why a search ended without a trial meeting the target (its most common failure)."""
    held = [t for t in trials if holds_slot(t)]
    reasons = Counter(t.user_attrs.get("fail_reason", "") for t in held if t.state == state("FAIL"))
    why = f"; most common failure: {reasons.most_common(1)[0][0]}" if reasons else ""
    target = f" meeting the target {metric} {ratio:g}x" if ratio is not None else ""
    return f"no trial of {len(held)} completed{target}{why}"


def method_mix(trials, top: int = 5) -> dict:
    """Which methods a method search (`learner: auto`) tried, and which the `top` best trials that
    meet the target use: {"tried": {method: n}, "best": {method: n}} ({} without a method dimension)."""
    done = [t for t in trials if holds_slot(t) and is_finished(t) and "method" in t.params]
    if not done:
        return {}
    best = sorted((t for t in done if is_feasible(t)), key=lambda t: -t.values[0])[:top]
    return {"tried": dict(Counter(t.params["method"] for t in done).most_common()),
            "best": dict(Counter(t.params["method"] for t in best).most_common()), "top": len(best)}


def mix_line(mix: dict) -> str:
    """`methods: weight_sparsity+uniform_quant 3 of the 5 best (7 tried), ...`"""
    return "methods: " + ", ".join(f"{m} {mix['best'].get(m, 0)} of the {mix['top']} best ({n} tried)"
                                   for m, n in mix["tried"].items())


def summary(trials, best, **about) -> dict:
    """The search section of metrics.json: what was run (`about`: optimizer, storage, timing...),
    the best trial, and how the budget was spent."""
    held = [t for t in trials if holds_slot(t)]
    states = Counter(t.state.name.lower() for t in held)
    return {
        **about,
        "best_trial": best.number, "best_val_accuracy": best.values[0],
        "best_ratio": best.user_attrs.get("ratio"), "best_raw_params": best.user_attrs.get("params"),
        "n_trials": sum(is_finished(t) for t in held), "n_complete": states.get("complete", 0),
        "n_pruned": states.get("pruned", 0), "n_failed": states.get("fail", 0),
        "n_infeasible": sum(1 for t in held if t.state == state("COMPLETE") and not is_feasible(t)),
        "n_interrupted": sum(1 for t in trials if is_void(t)),
        **({"methods": mix} if (mix := method_mix(trials)) else {}),
    }
