"""The outer search: which learner params give the best validation accuracy at the target ratio.

One loop, whatever the optimizer: ask a point -> project it onto the target (learner.project,
before any training) -> compress with a short fine-tune (search.trial_epochs / trial_steps) ->
validation accuracy of the deployable model and its measured ratio, recorded in the study.

The Optuna study is the only state, so resume and parallel workers come from one place.
Workers that share a study (same storage URL and study name) share its budget: the search
stops when the study holds `search.trials` finished trials. A RUNNING trial whose worker died
(same host: its pid is gone; another host: no heartbeat for GRACE_SECONDS) is failed as
"interrupted", does not count, and is re-run with the same point. Under Horovod rank 0 alone
talks to the study and broadcasts each decision; every rank trains (the trainer is data-parallel).
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

from pocketflow.errors import PocketFlowError
from pocketflow.io import to_builtin
from pocketflow.registry import did_you_mean

HEARTBEAT_SECONDS = 20  # a running trial's liveness record in the study
GRACE_SECONDS = 90      # no heartbeat for this long: the worker on another host is presumed dead
POLL_SECONDS = 2.0      # how often an idle worker looks at trials other workers are running
INFEASIBLE_TOLERANCE = 0.01  # a measured ratio 1% under the target still counts as meeting it

# -- reading the study ------------------------------------------------------------------------------


def _state(name):
    from optuna.trial import TrialState
    return getattr(TrialState, name)


def is_void(t) -> bool:
    """A trial that does not count towards the budget: interrupted (its worker died; re-run)
    or surplus (started by a worker that lost the race for the last slot). A FAIL without a
    recorded reason was failed by Optuna's heartbeat check, i.e. interrupted too."""
    return t.state == _state("FAIL") and (bool(t.user_attrs.get("void")) or "fail_reason" not in t.user_attrs)


def counts(t) -> bool:
    """Whether a trial holds one slot of the budget (finished or running, not void)."""
    return t.state != _state("WAITING") and not is_void(t)


def is_finished(t) -> bool:
    return t.state in (_state("COMPLETE"), _state("PRUNED"), _state("FAIL"))


def is_feasible(t) -> bool:
    """COMPLETE and meeting the target (all constraint values <= 0)."""
    return t.state == _state("COMPLETE") and all(c <= 0 for c in t.constraints.values())


def best_trial(trials):
    """The highest validation accuracy among trials that meet the target, or None."""
    ok = [t for t in trials if is_feasible(t)]
    return max(ok, key=lambda t: (t.value, -t.number)) if ok else None


def _sqlite_path(url: str) -> str | None:
    """The file of an SQLite URL (None for other databases and in-memory SQLite)."""
    from sqlalchemy.engine import make_url
    try:
        u = make_url(url)
    except Exception:
        return None
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return u.database


def _sqlite_wal(path: str) -> None:
    """Switch an SQLite study file to write-ahead logging (persistent in the file).

    Every trial writes about fifteen small transactions (user attributes, tell, heartbeat);
    in SQLite's default rollback-journal mode each costs several fsyncs, which made study I/O
    the largest part of the search overhead (~0.5 s per trial; ~0.08 s with WAL and
    synchronous=NORMAL). WAL also lets readers (other workers, optuna-dashboard) run while a
    worker writes. A process killed mid-write loses nothing committed; only an OS crash or
    power loss can lose the last commits. WAL needs every process on one host (shared memory),
    which SQLite over a network filesystem never supported well anyway: use PostgreSQL there.
    """
    import sqlite3
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=120)) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error:  # e.g. locked by a worker in the middle of a write: keep its mode
        pass


def _sqlite_tune(engine) -> None:
    """synchronous=NORMAL on every (new) connection of the study's engine: with WAL, commits
    no longer fsync (the log is synced at checkpoints), which is safe against process crashes."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_con, _record):
        cur = dbapi_con.cursor()
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
    engine.dispose()  # pooled connections were opened before the listener: reopen them with it


def _masked(url: str) -> str:
    """A storage URL without its password (the summary lands in metrics.json)."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: nothing to hide that we can parse
        return url


# -- space ------------------------------------------------------------------------------------------


def build_space(learner, model, search_cfg: dict):
    """The learner's space with `search.space` overrides applied and `search.fix` dims removed."""
    from pocketflow.hpo.space import Categorical, Float, Int, from_config
    space = dict(learner.search_space(model))

    def check_name(key, name):
        if name not in space:
            names = list(space)
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise PocketFlowError(f"search.{key}: unknown dimension '{name}'{did_you_mean(name, names)}; "
                                  f"learner '{learner.name}' searches: {shown}")

    for name, spec in (search_cfg.get("space") or {}).items():
        check_name("space", name)
        try:
            dim = from_config(spec, space[name])
        except ValueError as e:
            raise PocketFlowError(f"search.space.{name}: {e}") from None
        if isinstance(dim, (Float, Int)) and not dim.low < dim.high:
            raise PocketFlowError(f"search.space.{name}: low must be below high, got {list(spec)}")
        if isinstance(dim, (Float, Int)) and dim.log and dim.low <= 0:
            raise PocketFlowError(f"search.space.{name}: a log-scale range must be > 0, got {list(spec)}")
        if isinstance(dim, Categorical) and not dim.choices:
            raise PocketFlowError(f"search.space.{name}: no choices given")
        space[name] = dim
    fixed = {}
    for name, value in (search_cfg.get("fix") or {}).items():
        check_name("fix", name)
        fixed[name] = value
        del space[name]
    return space, fixed


# -- learner: auto ----------------------------------------------------------------------------------

#: what `learner: auto` picks per target metric: the first candidate whose learners are all registered
_SIZE_CHAIN = {"name": "chain", "steps": ["weight_sparsity", "uniform_quant"]}
AUTO_LEARNERS = {
    "flops": [{"name": "channel_pruning"}],
    "latency": [{"name": "channel_pruning"}],
    "compression": [_SIZE_CHAIN, {"name": "weight_sparsity"}, {"name": "uniform_quant"}],
    "params": [{"name": "weight_sparsity"}],  # quantizing leaves the count unchanged: pure accuracy loss
}


def _names_in(section: dict) -> list[str]:
    return [section["name"]] + list(section.get("steps", ()))


def choose_learner(metric: str) -> dict:
    """The `learner:` section `learner: auto` stands for. Speed targets (flops, latency) prune
    channels: a narrower dense model is faster everywhere. A bytes target (compression)
    sparsifies and then quantizes the survivors, which shrinks bytes most for the accuracy lost;
    a parameter-count target only sparsifies (fewer bits do not lower the count).
    Returns a fresh dict the caller may merge into."""
    import copy

    from pocketflow.learners import LEARNERS
    if metric not in AUTO_LEARNERS:
        raise PocketFlowError(f"learner: auto has no choice for target metric '{metric}'; "
                              f"choose from: {', '.join(AUTO_LEARNERS)}")
    for cand in AUTO_LEARNERS[metric]:
        if all(n in LEARNERS for n in _names_in(cand)):
            return copy.deepcopy(cand)
    wanted = " or ".join("+".join(n for n in _names_in(c) if n != "chain") for c in AUTO_LEARNERS[metric])
    raise PocketFlowError(f"learner: auto for target metric '{metric}' needs {wanted}, none of which is installed")


def resolve_auto(section: dict, metric: str) -> dict:
    """A raw `learner:` section with `name: auto` replaced by `choose_learner(metric)`; the
    user's shared keys (fine_tune, distill) are kept (a chain hands them to its steps)."""
    if not isinstance(section, dict) or section.get("name") != "auto":
        return section
    return {**choose_learner(metric), **{k: v for k, v in section.items() if k != "name"}}


# -- the search -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _heartbeat(storage, trial_id: int):
    """Record the trial's liveness every HEARTBEAT_SECONDS while it runs (Optuna's RDB heartbeat,
    read by `fail_stale_trials` in other workers)."""
    stop = threading.Event()

    def beat():
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a missed beat only risks an early re-run elsewhere
                pass
            if stop.wait(HEARTBEAT_SECONDS):
                return

    th = threading.Thread(target=beat, name="pocketflow-heartbeat", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join(timeout=10)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pruner(name: str, budget: int):
    import optuna
    factories = {
        "none": lambda: optuna.pruners.NopPruner(),
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, budget // 5))),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
    }
    if name not in factories:
        raise PocketFlowError(f"unknown pruner '{name}'{did_you_mean(name, factories)}; "
                              f"choose from: {', '.join(factories)}")
    return factories[name]()


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
        self.train_s = self.eval_s = self.wait_s = 0.0
        self.ran = 0
        self.timers: Counter = Counter()  # where the search overhead goes (seconds per part)
        self._report_step = 0
        self._bar = None

    @contextlib.contextmanager
    def _timed(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timers[part] += time.perf_counter() - t0

    # -- checks and the study (rank 0) ------------------------------------------------------------
    def check(self):
        if not len(self.ctx.data.x_val):
            raise PocketFlowError("the search scores trials on the validation split; set data.val_split > 0")
        self.learner.check_target(self.model, self.metric, self.ratio)

    def storage_url(self) -> str:
        return self.cfg["storage"] or f"sqlite:///{(self.ctx.run_dir / 'study.db').resolve()}"

    def open_study(self):
        import optuna
        from optuna.storages import RDBStorage
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = self.storage_url()
        sqlite = _sqlite_path(url)
        kw = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        if sqlite is not None and Path(sqlite).parent.is_dir():
            _sqlite_wal(sqlite)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for attempt in range(8):
                try:
                    self.storage = RDBStorage(url, engine_kwargs=kw, heartbeat_interval=HEARTBEAT_SECONDS,
                                              grace_period=GRACE_SECONDS,
                                              heartbeat_stale_trial_callback=lambda s, t: self._requeue(t))
                    break
                except Exception as e:  # bad URL, unreachable server, missing driver
                    text = str(e)
                    if attempt < 7 and ("already exists" in text or "duplicate key" in text):
                        # workers started together race to create the schema: the loser waits
                        # for the winner's tables and opens them
                        time.sleep(0.5 + random.random())
                        continue
                    raise PocketFlowError(f"search.storage {_masked(url)}: cannot open ({type(e).__name__}: "
                                          f"{text.splitlines()[0][:200]})") from None
            if sqlite is not None:
                _sqlite_tune(self.storage.engine)
        name = self.cfg["study_name"] or self.ctx.cfg["name"]
        study = optuna.create_study(storage=self.storage, study_name=name, direction="maximize",
                                    load_if_exists=True, pruner=_pruner(self.cfg["pruner"], self.budget))
        identity = {"learner": self.learner.name, "metric": self.metric, "ratio": self.ratio}
        old = study.user_attrs.get("pocketflow")
        if old is None:
            study.set_user_attr("pocketflow", to_builtin(identity))
        elif {k: old.get(k) for k in identity} != identity:
            raise PocketFlowError(f"study '{name}' in {_masked(url)} belongs to another search (learner "
                                  f"{old.get('learner')}, target {old.get('metric')} {old.get('ratio')}x); "
                                  "set search.study_name to start a new one")
        self.study, self.url, self.study_name = study, url, name
        self._reap()
        trials = study.get_trials(deepcopy=False)
        live = any(t.state == _state("RUNNING") for t in trials)
        # a resumed or joining worker must not replay the draws of the first one
        seed = int(self.ctx.cfg["seed"]) + len(trials) + (os.getpid() if live else 0)
        from pocketflow.hpo.optimizers import make_optimizer
        self.optimizer = make_optimizer(self.optimizer_name, self.space, seed, self.budget,
                                        {"grid_points": self.cfg.get("grid_points")})
        study.sampler = self.optimizer.sampler()
        cap = self.optimizer.capacity()
        if cap is not None and cap < self.budget:
            self.budget = cap
        done = [t for t in trials if counts(t) and is_finished(t)]
        if done:
            self._log(f"search: study '{name}' has {len(done)} finished trial(s); continuing to {self.budget}")

    def _requeue(self, t):
        """Run an interrupted trial's point again (its slot was freed by marking it void)."""
        self.study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})

    def _reap(self):
        """Fail RUNNING trials whose worker is gone, as 'interrupted', and re-queue their points."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)  # other hosts: heartbeat too old
        host, now = socket.gethostname(), time.time()
        for t in self.study.get_trials(deepcopy=False, states=(_state("RUNNING"),)):
            w = t.user_attrs.get("worker")
            if w is not None:
                dead = w.get("host") == host and (w.get("pid") == os.getpid() or not _pid_alive(w.get("pid", 0)))
                why = f"interrupted: worker {w.get('host')}:{w.get('pid')} is gone"
            else:  # died between creating the trial and tagging it
                dead = t.datetime_start is not None and now - t.datetime_start.timestamp() > GRACE_SECONDS
                why = "interrupted: no worker recorded"
            if not dead:
                continue
            try:
                self.storage.set_trial_user_attr(t._trial_id, "void", "interrupted")
                self.storage.set_trial_user_attr(t._trial_id, "fail_reason", why)
                self.storage.set_trial_state_values(t._trial_id, state=_state("FAIL"))
            except UpdateFinishedTrialError:
                continue  # another worker got there first
            self._log(f"trial {t.number}: {why}; re-running its point")
            self._requeue(t)

    # -- choosing the next trial (rank 0) ---------------------------------------------------------
    def _history(self, trials):
        """(number, params, value) of finished trials for the optimizer; failed, infeasible and
        pruned-without-values trials get the worst value seen (accuracy-like, higher is better)."""
        done = [t for t in trials if counts(t) and is_finished(t)]
        values = [t.value for t in done if t.state == _state("COMPLETE")]
        floor = min(values) if values else 0.0
        for t in done:
            if is_feasible(t):
                yield t.number, t.params, t.value
            elif t.state == _state("PRUNED") and t.intermediate_values:
                yield t.number, t.params, min(floor, t.intermediate_values[max(t.intermediate_values)])
            else:
                yield t.number, t.params, floor

    def _next(self):
        """The next trial to run as {'number', 'params'}, or None when the budget is spent."""
        while True:
            if self.cfg.get("timeout") and time.perf_counter() - self.t_start > self.cfg["timeout"]:
                self._log(f"search: timeout of {self.cfg['timeout']:g}s reached")
                return None
            with self._timed("study_io"):
                self._reap()
                trials = self.study.get_trials(deepcopy=False)
            held = [t for t in trials if counts(t)]
            if sum(is_finished(t) for t in held) >= self.budget:
                return None
            if len(held) >= self.budget:  # the rest of the budget is running in other workers
                t0 = time.perf_counter()
                time.sleep(POLL_SECONDS)
                self.wait_s += time.perf_counter() - t0
                continue
            pending = [t.params for t in held if t.state == _state("RUNNING")]
            with self._timed("optimizer"), warnings.catch_warnings():
                # we run the heartbeat ourselves (ask/tell, not optimize)
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                self.optimizer.sync(self._history(trials))
                trial = self.optimizer.ask(self.study, pending)  # (includes creating the trial row)
            with self._timed("study_io"):
                trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
                ahead = sum(1 for t in self.study.get_trials(deepcopy=False)
                            if counts(t) and t.number < trial.number)
            if ahead >= self.budget:  # another worker took the last slot meanwhile
                trial.set_user_attr("void", "surplus")
                self._finish_trial(trial, "FAIL", reason="surplus: the budget was already taken")
                if "retry_of" in trial.user_attrs:
                    self._requeue(trial)
                continue
            raw = to_builtin({**trial.params, **self.fixed})
            with self._timed("study_io"):
                trial.set_user_attr("params", raw)
            self.trial = trial
            return {"number": trial.number, "raw": raw}

    # -- running one trial (every rank) -----------------------------------------------------------
    def _total_steps(self) -> int:
        """Steps the trial's fine-tune will take, as the trainer counts them (to skip pruning on
        the last epoch, where stopping saves nothing and loses a finished result)."""
        ft = self.learner.cfg["fine_tune"]
        n, b = len(self.ctx.data.x_train), int(ft["batch_size"])
        per_epoch = max(1, n // b if self.world.distributed else math.ceil(n / b))
        if self.cfg["trial_steps"]:
            return int(self.cfg["trial_steps"])
        return int(math.ceil(self.cfg["trial_epochs"] * per_epoch))

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
        try:
            params = raw
            if self.ratio is not None:
                params = self.learner.project(self.model, raw, self.metric, self.ratio)
            params = to_builtin(params)
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
        return params

    def _run(self, decision: dict):
        import optuna

        from pocketflow import metrics as M
        from pocketflow.errors import TrialFailed
        from pocketflow.faults import crash_point
        from pocketflow.learners import Budget
        root = self.world.is_root
        with self._timed("projection"):
            params = self._project(decision["raw"])
        if params is None:
            return
        self._report_step = 0
        budget = Budget(epochs=self.cfg["trial_epochs"], steps=self.cfg["trial_steps"],
                        on_epoch_end=self._on_epoch_end)
        beat = _heartbeat(self.storage, self.trial._trial_id) if root else contextlib.nullcontext()
        t0 = time.perf_counter()
        with beat:
            try:
                crash_point("trial")  # the trial is RUNNING in the study, nothing trained yet
                comp = self.learner.compress(self.model, params, self.ctx.data, budget)
                t1 = time.perf_counter()
                self.train_s += t1 - t0
                if root:
                    crash_point("trial_eval")  # trained, not yet recorded
                    acc = M.accuracy(comp.deploy, self.ctx.data.x_val, self.ctx.data.y_val)
                    ratio = float(self.learner.measure(self.model, comp, self.metric))
                    self.eval_s += time.perf_counter() - t1
                    with self._timed("study_io"):
                        self._complete(acc, ratio, comp, time.perf_counter() - t0, t1 - t0)
            except optuna.TrialPruned as e:
                self.train_s += time.perf_counter() - t0
                if root:
                    self._finish_trial(self.trial, "PRUNED", reason=str(e), seconds=time.perf_counter() - t0)
            except TrialFailed as e:
                self.train_s += time.perf_counter() - t0
                if root:
                    self._finish_trial(self.trial, "FAIL", reason=str(e), seconds=time.perf_counter() - t0)
            except PocketFlowError as e:  # a point the learner rejects: record it, keep searching
                if root:
                    self._finish_trial(self.trial, "FAIL", reason=f"{type(e).__name__}: {e}",
                                       seconds=time.perf_counter() - t0)
            except KeyboardInterrupt:
                if root:  # the point is re-run on resume
                    self.trial.set_user_attr("void", "interrupted")
                    self._finish_trial(self.trial, "FAIL", reason="interrupted: stopped by the user")
                    self._requeue(self.trial)
                raise
            except Exception as e:  # a bug: record why, then stop (re-running it would fail again)
                if root:
                    self._finish_trial(self.trial, "FAIL", reason=f"error: {type(e).__name__}: {e}"[:500])
                raise
        self.ran += 1
        if root:
            with self._timed("progress"):
                self._progress(decision["number"])

    # -- recording (rank 0) -----------------------------------------------------------------------
    def _complete(self, acc: float, ratio: float, comp, seconds: float, train_seconds: float):
        t = self.trial
        attrs = {"val_acc": float(acc), "metric": self.metric, "ratio": ratio,
                 "size_bytes": int(comp.size_bytes), "seconds": seconds, "train_seconds": train_seconds}
        if comp.info and len(repr(comp.info)) < 20000:
            attrs["info"] = to_builtin(comp.info)
        for k, v in attrs.items():
            t.set_user_attr(k, v)
        if self.ratio is not None:
            floor = self.ratio * (1 - INFEASIBLE_TOLERANCE)
            t.set_user_attr("feasible", bool(ratio >= floor))
            t.set_constraint("ratio", (floor - ratio) / self.ratio)  # <= 0: meets the target
        self.study.tell(t, float(acc))

    def _finish_trial(self, trial, state: str, reason: str, seconds: float | None = None):
        import optuna
        trial.set_user_attr("fail_reason" if state == "FAIL" else "prune_reason", reason)
        if seconds is not None:
            trial.set_user_attr("seconds", seconds)
        self.study.tell(trial, state=getattr(optuna.trial.TrialState, state))

    def _progress(self, number: int):
        trials = self.study.get_trials(deepcopy=False)
        t = trials[number]
        done = sum(1 for x in trials if counts(x) and is_finished(x))
        best = best_trial(trials)
        if t.state == _state("COMPLETE"):
            what = f"val_acc {t.value:.4f}"
            if "ratio" in t.user_attrs:
                what += f", {self.metric} {t.user_attrs['ratio']:.2f}x" + (
                    "" if is_feasible(t) else " (misses the target)")
        else:
            what = t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason") or ""
        secs = t.user_attrs.get("seconds")
        line = (f"trial {number} [{done}/{self.budget}] {t.state.name.lower()}: {what}"
                + (f" ({secs:.1f}s)" if secs is not None else "")
                + (f" | best {best.value:.4f} (trial {best.number})" if best else " | no feasible trial yet"))
        if self._bar is not None:
            self._bar.n = min(done, self.budget)
            self._bar.refresh()
            self._bar.write(line)
        else:
            print(line, flush=True)

    def _log(self, msg: str):
        if self.world.is_root:
            (self._bar.write if self._bar is not None else print)(msg)
            sys.stdout.flush()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self):
        self.t_start = time.perf_counter()
        w = self.world
        error = None
        if w.is_root:
            try:
                with self._timed("check"):
                    self.check()
                with self._timed("open_study"):
                    self.open_study()
                self._log(f"search: {self.optimizer_name} over {len(self.space)} dimension(s), "
                          f"{self.budget} trials, study '{self.study_name}' in {_masked(self.url)}")
            except Exception as e:
                error = e
        if w.broadcast_object(None if error is None else str(error)) is not None:
            if error is not None:
                raise error
            raise _Stop("rank 0 could not start the search")
        if w.is_root and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.budget, desc="search", unit="trial", leave=False)
        try:
            while True:
                decision = error = None
                if w.is_root:
                    try:
                        decision = self._next()
                    except Exception as e:
                        error = e
                        decision = {"error": str(e)}
                decision = w.broadcast_object(decision)
                if error is not None:
                    raise error
                if decision is None:
                    break
                if "error" in decision:
                    raise _Stop(decision["error"])
                self._run(decision)
            result = self._result() if w.is_root else None
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self.storage is not None:
                with contextlib.suppress(Exception):
                    # closing the pooled connections checkpoints an SQLite WAL back into
                    # study.db (and removes the -wal file when no other worker has it open)
                    self.storage.engine.dispose()
        result = w.broadcast_object(result)
        if "error" in result:
            raise PocketFlowError(result["error"])
        return result["params"], result["summary"]

    def _result(self) -> dict:
        from pocketflow.hpo.report import write_report
        trials = self.study.get_trials(deepcopy=False)
        try:
            with self._timed("report"):
                write_report(self.study, self.ctx.run_dir)
        except Exception as e:  # a plotting problem must not cost the search its result
            print(f"search: warning: report not written ({type(e).__name__}: {e})", file=sys.stderr)
        best = best_trial(trials)
        held = [t for t in trials if counts(t)]
        if best is None:
            reasons = Counter(t.user_attrs.get("fail_reason", "") for t in held if t.state == _state("FAIL"))
            why = f"; most common failure: {reasons.most_common(1)[0][0]}" if reasons else ""
            target = f" meeting the target {self.metric} {self.ratio:g}x" if self.ratio is not None else ""
            return {"error": f"no trial of {len(held)} completed{target}{why}"}
        wall = time.perf_counter() - self.t_start
        overhead = max(0.0, wall - self.train_s - self.eval_s - self.wait_s)
        parts = {k: round(v, 3) for k, v in sorted(self.timers.items(), key=lambda kv: -kv[1])}
        parts["other"] = round(max(0.0, overhead - sum(self.timers.values())), 3)
        states = Counter(t.state.name.lower() for t in held)
        summary = {
            "optimizer": self.optimizer.info(), "pruner": self.cfg["pruner"] if self.optimizer.prunes else "none",
            "study_name": self.study_name, "storage": _masked(self.url),
            "best_trial": best.number, "best_val_accuracy": best.value,
            "best_ratio": best.user_attrs.get("ratio"), "best_raw_params": best.user_attrs.get("params"),
            "n_trials": sum(is_finished(t) for t in held), "n_complete": states.get("complete", 0),
            "n_pruned": states.get("pruned", 0), "n_failed": states.get("fail", 0),
            "n_infeasible": sum(1 for t in held if t.state == _state("COMPLETE") and not is_feasible(t)),
            "n_interrupted": sum(1 for t in trials if is_void(t)),
            "trials_this_worker": self.ran, "wall_seconds": wall, "trial_train_seconds": self.train_s,
            "trial_eval_seconds": self.eval_s, "wait_seconds": self.wait_s,
            "search_overhead_seconds": overhead, "search_overhead_share": overhead / wall if wall else 0.0,
            "search_overhead_parts": parts,
            "report": str(self.ctx.run_dir / "report.md"),
        }
        self._log(f"search: best trial {best.number}: val_acc {best.value:.4f}"
                  + (f", {self.metric} {best.user_attrs['ratio']:.2f}x" if "ratio" in best.user_attrs else "")
                  + f"; overhead {overhead:.1f}s of {wall:.1f}s ({100 * summary['search_overhead_share']:.1f}%)")
        return {"params": to_builtin(best.user_attrs["projected"]), "summary": to_builtin(summary)}


def run_search(ctx):
    """Search the learner's space for `ctx`; returns (best projected params, summary dict)."""
    try:
        return Search(ctx).run()
    except _Stop as e:
        raise PocketFlowError(str(e)) from None
