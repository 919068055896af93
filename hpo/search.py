"""The outer search: which learner params give the best validation accuracy at the target ratio.

One loop, whatever the optimizer: ask a point -> project it onto the target (learner.project,
before any training) -> optionally a cheap ranking score that may prune it (search.rank,
hpo.fidelity) -> compress with a short fine-tune (search.trial_epochs / trial_steps) ->
validation accuracy of the deployable model and its measured ratio, recorded in the study.

The Optuna study (hpo.study) is the only state, so resume and parallel workers come from one
place. Workers that share a study (same storage URL and study name) share its budget: the search
stops when the study holds `search.trials` finished trials; trials of dead workers are re-run
(hpo.liveness). Under Horovod rank 0 alone talks to the study and broadcasts each decision;
every rank trains (the trainer is data-parallel).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

from pocketflow.errors import PocketFlowError
from pocketflow.hpo import liveness, progress
from pocketflow.hpo.space import build_space, complete_point
from pocketflow.hpo.fidelity import Ranker
from pocketflow.hpo.pareto import Objectives
from pocketflow.hpo.study import (best_trial, history, holds_slot, is_finished, make_pruner, open_storage, open_study,
                                  prediction_bias, state)
from pocketflow.io import redact_url, to_builtin
from pocketflow.targets import FILE_METRICS, TOLERANCE

POLL_SECONDS = 2.0      # how often an idle worker looks at trials other workers are running


class _Stop(Exception):
    """Raised on every Horovod rank when rank 0 hit an error (carries its message)."""


class Search:
    """One worker's part of a study; `run()` returns (best projected params, summary)."""

    def __init__(self, ctx):
        from pocketflow.distributed import world
        self.ctx, self.cfg, self.learner, self.model = ctx, ctx.cfg["search"], ctx.learner, ctx.model
        self.world = world()
        self.metric, self.ratio = ctx.target["metric"], ctx.target["ratio"]
        self.optimizer_name = self.cfg["optimizer"]
        self.space, self.fixed = build_space(self.learner, self.model, self.cfg)
        self.learner.prepare_search(self.model, self.metric)  # one-off, before the search clock
        self.study = self.storage = self.optimizer = None
        self.trial = None  # rank 0: the trial being run
        self.budget = int(self.cfg["trials"])
        self.ran = 0
        self._report_step = 0
        self._bar = None
        self.ranker = Ranker(self)  # search.rank: a cheap score before each fine-tune
        self.objectives = Objectives(self.cfg)  # accuracy, or the pareto vector (hpo.pareto)
        self.clock = progress.Clock()  # the search clock starts after prepare_search

    # -- checks and the study (rank 0) ------------------------------------------------------------
    def check(self):
        if not len(self.ctx.data.x_val):
            raise PocketFlowError("the search scores trials on the validation split; set data.val_split > 0")
        self.learner.check_target(self.model, self.metric, self.ratio)

    def storage_url(self) -> str:
        return self.cfg["storage"] or f"sqlite:///{(self.ctx.run_dir / 'study.db').resolve()}"

    def open_study(self):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.url = url = self.storage_url()
        self.storage = open_storage(url, lambda s, t: self._requeue(t))
        self.study_name = name = self.cfg["study_name"] or self.ctx.cfg["name"]
        identity = {"learner": self.learner.name, "metric": self.metric, "ratio": self.ratio,
                    **self.objectives.identity()}
        self.study = open_study(self.storage, name, make_pruner(self.cfg["pruner"], self.budget), identity, url,
                                self.objectives.directions)
        self._reap()
        trials = self.study.get_trials(deepcopy=False)
        live = any(t.state == state("RUNNING") for t in trials)
        # a resumed or joining worker must not replay the draws of the first one
        seed = int(self.ctx.cfg["seed"]) + len(trials) + (os.getpid() if live else 0)
        self.optimizer = self.objectives.optimizer(self.optimizer_name, self.space, seed, self.budget,
                                                   {"grid_points": self.cfg.get("grid_points")})
        self.study.sampler = self.optimizer.sampler()
        cap = self.optimizer.capacity()
        if cap is not None and cap < self.budget:
            self.budget = cap
        done = [t for t in trials if holds_slot(t) and is_finished(t)]
        if done:
            self._log(f"search: study '{name}' has {len(done)} finished trial(s); continuing to {self.budget}")
        elif not trials:  # a new study: the learner's starting points go first
            for p in self.learner.initial_points(self.model)[:self.budget]:
                self.study.enqueue_trial(complete_point(self.space, p), user_attrs={"initial": True})

    def _requeue(self, t):
        """Run an interrupted trial's point again (its slot was freed by marking it void)."""
        self.study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})

    def _reap(self):
        liveness.reap(self.study, self.storage, self._requeue, self._log)

    # -- choosing the next trial (rank 0) ---------------------------------------------------------
    def _next(self):
        """The next trial to run as {'number', 'raw'}, or None when the budget is spent."""
        while True:
            if self.cfg.get("timeout") and self.clock.elapsed() > self.cfg["timeout"]:
                self._log(f"search: timeout of {self.cfg['timeout']:g}s reached")
                return None
            with self.clock.timed("study_io"):
                self._reap()
                trials = self.study.get_trials(deepcopy=False)
            held = [t for t in trials if holds_slot(t)]
            if sum(is_finished(t) for t in held) >= self.budget:
                return None
            if len(held) >= self.budget:  # the rest of the budget is running in other workers
                t0 = time.perf_counter()
                time.sleep(POLL_SECONDS)
                self.clock.wait_s += time.perf_counter() - t0
                continue
            raw = self._ask(trials, held)
            if raw is not None:
                return {"number": self.trial.number, "raw": raw}

    def _ask(self, trials, held):
        """The point of a new trial (now `self.trial`) from the optimizer, tagged with this worker;
        None if another worker took the last slot meanwhile (the new trial is marked surplus)."""
        pending = [t.params for t in held if t.state == state("RUNNING")]
        with self.clock.timed("optimizer"), warnings.catch_warnings():
            # we run the heartbeat ourselves (ask/tell, not optimize)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            self.optimizer.sync(history(trials))
            trial = self.optimizer.ask(self.study, pending)  # (includes creating the trial row)
        with self.clock.timed("study_io"):
            trial.set_user_attr("worker", liveness.worker_tag())
            ahead = sum(1 for t in self.study.get_trials(deepcopy=False)
                        if holds_slot(t) and t.number < trial.number)
        if ahead >= self.budget:
            trial.set_user_attr("void", "surplus")
            self._finish_trial(trial, "FAIL", reason="surplus: the budget was already taken")
            if "retry_of" in trial.user_attrs:
                self._requeue(trial)
            return None
        raw = to_builtin({**trial.params, **self.fixed})
        with self.clock.timed("study_io"):
            trial.set_user_attr("params", raw)
        self.trial = self.objectives.wrap(trial, self)
        return raw

    # -- running one trial (every rank) -----------------------------------------------------------
    def _budget(self):
        from pocketflow.learners import Budget
        return Budget(epochs=self.cfg["trial_epochs"], steps=self.cfg["trial_steps"],
                      on_epoch_end=self._on_epoch_end)

    def _total_steps(self) -> int:
        """Steps the trial's fine-tune will take, as the trainer counts them (to skip pruning on
        the last epoch, where stopping saves nothing and loses a finished result)."""
        from pocketflow.training import budget_steps
        b = self._budget()
        return budget_steps(self.learner.cfg["fine_tune"], len(self.ctx.data.x_train), b.epochs, b.steps)

    def _on_epoch_end(self, epoch: int, logs: dict):
        import optuna
        prune = False
        if self.world.is_root and logs.get("val_acc") is not None:
            self._report_step += 1  # monotonic: a chain learner fine-tunes more than once
            self.trial.report(float(logs["val_acc"]), self._report_step)
            last = logs.get("steps", 0) >= self._total_steps()
            prune = self.optimizer.prunes and not last and self.trial.should_prune()
        if self.world.broadcast_object(prune):
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1} (val_acc {logs.get('val_acc', 0):.4f})")

    def _project(self, raw: dict) -> dict | None:
        """The point moved onto the target before training; every rank projects (a latency
        projection measures, and the learner averages the measurement across ranks)."""
        root = self.world.is_root
        aim = self.ratio
        try:
            params = raw
            if self.ratio is not None:
                bias = prediction_bias(self.study.get_trials(deepcopy=False), raw.get("method")) if root else None
                aim = self.ratio * self.world.broadcast_object(bias)
                params = self.objectives.project(self.learner, self.model, raw, self.metric, aim)
            params = to_builtin(params)
            self.objectives.predict(self, params)
        except PocketFlowError as e:  # this point cannot meet the target: a failed trial
            if root:
                self._finish_trial(self.trial, "FAIL", reason=f"projection: {e}")
                self._progress(self.trial.number)
            return None
        if root:
            self.trial.set_user_attr("projected", params)
            if self.ratio is not None:
                self.trial.set_user_attr("predicted_ratio",
                                         float(self.learner.predict_ratio(self.model, params, self.metric)))
                self.trial.set_user_attr("projected_to", float(aim))
        return params

    def _run(self, decision: dict):
        with self.clock.timed("projection"):
            params = self._project(decision["raw"])
        if params is None:
            return
        self._report_step = 0
        root = self.world.is_root
        beat = liveness.heartbeat(self.storage, self.trial._trial_id) if root else contextlib.nullcontext()
        t0 = time.perf_counter()
        with beat, self._recorded(t0):
            self._train_and_score(params, t0)
        self.ran += 1
        if root:
            with self.clock.timed("progress"):
                self._progress(decision["number"])

    def _train_and_score(self, params: dict, t0: float):
        from pocketflow import metrics as M
        from pocketflow.faults import crash_point
        crash_point("trial")  # the trial is RUNNING in the study, nothing trained yet
        t_ft = self.ranker.gate(params)  # may prune the trial before its fine-tune
        comp = self.learner.compress(self.model, params, self.ctx.data, self._budget())
        t1 = time.perf_counter()
        self.clock.train_s += t1 - t0
        if self.world.is_root:
            crash_point("trial_eval")  # trained, not yet recorded
            acc = M.accuracy(comp.deploy, self.ctx.data.x_val, self.ctx.data.y_val)
            ratio = float(self.learner.measure(self.model, comp, self.metric))
            score = self.objectives.values(self, acc, ratio, comp)
            self.clock.eval_s += time.perf_counter() - t1
            with self.clock.timed("study_io"):
                self.ranker.finish(acc, t1 - t_ft)
                self._complete(acc, ratio, comp, time.perf_counter() - t0, t1 - t0, params, score)

    @contextlib.contextmanager
    def _recorded(self, t0: float):
        """How a trial that did not complete ends in the study: pruned, failed with its reason
        (the search goes on), interrupted (re-run on resume) or a bug (recorded, then raised)."""
        import optuna

        from pocketflow.errors import TrialFailed, stop_requested
        root = self.world.is_root
        try:
            yield
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt) or stop_requested():
                # stopped by the user (a library may have re-raised the interrupt as its own error):
                # the point is re-run on resume
                if root:
                    self.trial.set_user_attr("void", "interrupted")
                    self._finish_trial(self.trial, "FAIL", reason="interrupted: stopped by the user")
                    self._requeue(self.trial)
                if isinstance(e, KeyboardInterrupt):
                    raise
                raise KeyboardInterrupt from None
            if isinstance(e, (optuna.TrialPruned, TrialFailed)):
                self.clock.train_s += time.perf_counter() - t0
                if root:
                    self._finish_trial(self.trial, "PRUNED" if isinstance(e, optuna.TrialPruned) else "FAIL",
                                       reason=str(e), seconds=time.perf_counter() - t0)
            elif isinstance(e, PocketFlowError):  # a point the learner rejects: record it, keep searching
                if root:
                    self._finish_trial(self.trial, "FAIL", reason=f"{type(e).__name__}: {e}",
                                       seconds=time.perf_counter() - t0)
            else:  # a bug: record why, then stop (re-running it would fail again)
                if root and isinstance(e, Exception):
                    self._finish_trial(self.trial, "FAIL", reason=f"error: {type(e).__name__}: {e}"[:500])
                raise

    # -- recording (rank 0) -----------------------------------------------------------------------
    def _complete(self, acc: float, ratio: float, comp, seconds: float, train_seconds: float, params: dict, score):
        t, shipped = self.trial, self.learner.shipped_for(params)
        attrs = {"val_acc": float(acc), "metric": self.metric, "ratio": ratio,
                 **({"file": shipped.file} if self.metric in FILE_METRICS and shipped else {}),
                 "size_bytes": int(comp.size_bytes), "seconds": seconds, "train_seconds": train_seconds}
        if comp.info and len(repr(comp.info)) < 20000:
            attrs["info"] = to_builtin(comp.info)
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        if self.ratio is not None:
            floor = self.ratio * (1 - TOLERANCE)
            t.set_user_attr("feasible", bool(ratio >= floor))
            t.set_constraint("ratio", (floor - ratio) / self.ratio)  # <= 0: meets the target
        self.study.tell(t, score)

    def _finish_trial(self, trial, state_name: str, reason: str, seconds: float | None = None):
        trial.set_user_attr("fail_reason" if state_name == "FAIL" else "prune_reason", reason)
        if seconds is not None:
            trial.set_user_attr("seconds", seconds)
        self.study.tell(trial, state=state(state_name))

    def _progress(self, number: int):
        trials = self.study.get_trials(deepcopy=False)
        line = progress.trial_line(trials, number, self.budget, self.metric)
        if self._bar is not None:
            self._bar.n = min(sum(1 for x in trials if holds_slot(x) and is_finished(x)), self.budget)
            self._bar.refresh()
            self._bar.write(line)
        else:
            print(line, flush=True)

    def _log(self, msg: str):
        if self.world.is_root:
            (self._bar.write if self._bar is not None else print)(msg)
            sys.stdout.flush()

    # -- the loop ---------------------------------------------------------------------------------
    def _start(self):
        """Rank 0 checks and opens the study; every rank learns whether that worked."""
        error = None
        if self.world.is_root:
            try:
                with self.clock.timed("check"):
                    self.check()
                with self.clock.timed("open_study"):
                    self.open_study()
                self._log(f"search: {self.optimizer_name} over {len(self.space)} dimension(s), "
                          f"{self.budget} trials, study '{self.study_name}' in {redact_url(self.url)}")
            except Exception as e:
                error = e
        if self.world.broadcast_object(None if error is None else str(error)) is not None:
            if error is not None:
                raise error
            raise _Stop("rank 0 could not start the search")
        if self.world.is_root and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.budget, desc="search", unit="trial", leave=False)

    def _decide(self):
        """The next decision, the same on every rank (rank 0 asks the study)."""
        decision = error = None
        if self.world.is_root:
            try:
                decision = self._next()
            except Exception as e:
                error, decision = e, {"error": str(e)}
        decision = self.world.broadcast_object(decision)
        if error is not None:
            raise error
        if decision is not None and "error" in decision:
            raise _Stop(decision["error"])
        return decision

    def run(self):
        self._start()
        try:
            while (decision := self._decide()) is not None:
                self._run(decision)
            result = self._result() if self.world.is_root else None
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self.storage is not None:
                with contextlib.suppress(Exception):
                    # closing the pooled connections checkpoints an SQLite WAL back into
                    # study.db (and removes the -wal file when no other worker has it open)
                    self.storage.engine.dispose()
        result = self.world.broadcast_object(result)
        if "error" in result:
            raise PocketFlowError(result["error"])
        return result["params"], result["summary"]

    def _result(self) -> dict:
        from pocketflow.hpo.report import write_report
        trials = self.study.get_trials(deepcopy=False)
        try:
            with self.clock.timed("report"):
                write_report(self.study, self.ctx.run_dir)
        except Exception as e:  # a plotting problem must not cost the search its result
            print(f"search: warning: report not written ({type(e).__name__}: {e})", file=sys.stderr)
        best = best_trial(trials)
        if best is None:
            return {"error": progress.no_result(trials, self.metric, self.ratio)}
        summary = progress.summary(
            trials, best, optimizer=self.optimizer.info(),
            pruner=self.cfg["pruner"] if self.optimizer.prunes else "none",
            study_name=self.study_name, storage=redact_url(self.url), trials_this_worker=self.ran,
            **self.ranker.summary(trials), **self.objectives.summary(trials),
            **self.clock.account(), report=str(self.ctx.run_dir / "report.md"))
        self._log(f"search: best trial {best.number}: val_acc {best.values[0]:.4f}"
                  + (f", {self.metric} {best.user_attrs['ratio']:.2f}x" if "ratio" in best.user_attrs else "")
                  + f"; overhead {summary['search_overhead_seconds']:.1f}s of {summary['wall_seconds']:.1f}s "
                  f"({100 * summary['search_overhead_share']:.1f}%)")
        if "methods" in summary:  # a method search says what it chose and what else it tried
            self._log(f"search: {progress.mix_line(summary['methods'])}")
        return {"params": to_builtin(best.user_attrs["projected"]), "summary": to_builtin(summary)}


def run_search(ctx):
    """Search the learner's space for `ctx`; returns (best projected params, summary dict)."""
    try:
        return Search(ctx).run()
    except _Stop as e:
        raise PocketFlowError(str(e)) from None
