"""The Optuna study, the search's only state: opening its storage, and reading its trials.

Everything a worker needs to know (the budget spent, the best point, what failed and why) is
read back from the study, so resume, parallel workers and the report come from one place.
"""
from __future__ import annotations

import contextlib
import random
import time
import warnings
from pathlib import Path

from pocketflow.errors import PocketFlowError
from pocketflow.io import redact_url, to_builtin
from pocketflow.registry import did_you_mean

HEARTBEAT_SECONDS = 20  # a running trial's liveness record in the study
GRACE_SECONDS = 90      # no heartbeat for this long: the worker on another host is presumed dead
# what the loser of a schema-creation race sees: PostgreSQL, then SQLite (alembic's version row)
SCHEMA_RACE = ("already exists", "duplicate key", "UNIQUE constraint failed")


# -- trial predicates --------------------------------------------------------------------------------
def state(name: str):
    from optuna.trial import TrialState
    return getattr(TrialState, name)


def is_void(t) -> bool:
    """A trial that does not count towards the budget: interrupted (its worker died; re-run)
    or surplus (started by a worker that lost the race for the last slot). A FAIL without a
    recorded reason was failed by Optuna's heartbeat check, i.e. interrupted too."""
    return t.state == state("FAIL") and (bool(t.user_attrs.get("void")) or "fail_reason" not in t.user_attrs)


def holds_slot(t) -> bool:
    """Whether a trial holds one slot of the budget (finished or running, not void)."""
    return t.state != state("WAITING") and not is_void(t)


def is_finished(t) -> bool:
    return t.state in (state("COMPLETE"), state("PRUNED"), state("FAIL"))


def is_feasible(t) -> bool:
    """COMPLETE and meeting the target (all constraint values <= 0)."""
    return t.state == state("COMPLETE") and all(c <= 0 for c in t.constraints.values())


def best_trial(trials):
    """The highest validation accuracy among trials that meet the target, or None (accuracy is
    value 0 in pareto mode too)."""
    ok = [t for t in trials if is_feasible(t)]
    return max(ok, key=lambda t: (t.values[0], -t.number)) if ok else None


def history(trials):
    """(number, params, value) of finished trials for the optimizer; failed, infeasible and
    pruned trials get the worst value seen (accuracy-like, higher is better), a pruned one its
    last intermediate value if that is lower."""
    done = [t for t in trials if holds_slot(t) and is_finished(t)]
    values = [t.values[0] for t in done if t.state == state("COMPLETE")]
    floor = min(values) if values else 0.0
    for t in done:
        if is_feasible(t):
            yield t.number, t.params, t.values[0]
        elif t.state == state("PRUNED") and t.intermediate_values:
            yield t.number, t.params, min(floor, t.intermediate_values[max(t.intermediate_values)])
        else:
            yield t.number, t.params, floor


def prediction_bias(trials, method=None) -> float:
    """How much the ratio predictor has overrated the measured ratio so far: the 80th percentile of
    predicted / measured over completed trials (of the same `method` in a method search), 1 before
    the first. A size model or latency table sees the weights before fine-tuning; the trained
    file gzips 1-3% worse, varying by trial, and a trial 2% short of the target is lost, so the
    search projects onto target x bias from the second trial on (a high quantile, so most trials
    land on the target; clamped, so one odd trial cannot move it far). Each method has its own
    bias (a codebook gzips better than predicted, pruned channels worse)."""
    pairs = [t.user_attrs["predicted_ratio"] / t.user_attrs["ratio"] for t in trials
             if t.state == state("COMPLETE") and t.user_attrs.get("predicted_ratio") and t.user_attrs.get("ratio")
             and t.params.get("method") == method]
    return float(min(1.25, max(0.8, sorted(pairs)[int(0.8 * (len(pairs) - 1) + 0.5)]))) if pairs else 1.0


# -- storage -----------------------------------------------------------------------------------------
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


def open_storage(url: str, on_stale_trial):
    """An RDBStorage for `url` with heartbeats; `on_stale_trial(storage, trial)` runs for a
    trial whose worker on another host stopped beating. One-line error if it cannot open."""
    import optuna
    from optuna.storages import RDBStorage
    sqlite = _sqlite_path(url)
    kw = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if sqlite is not None and Path(sqlite).parent.is_dir():
        _sqlite_wal(sqlite)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(8):
            try:
                storage = RDBStorage(url, engine_kwargs=kw, heartbeat_interval=HEARTBEAT_SECONDS,
                                     grace_period=GRACE_SECONDS, heartbeat_stale_trial_callback=on_stale_trial)
                break
            except Exception as e:  # bad URL, unreachable server, missing driver
                text = str(e)
                if attempt < 7 and any(m in text for m in SCHEMA_RACE):
                    # workers (or a reader such as optuna-dashboard) opening a new study file
                    # together race to create the schema: the loser waits for the winner's
                    # tables and opens them
                    time.sleep(0.5 + random.random())
                    continue
                raise PocketFlowError(f"search.storage {redact_url(url)}: cannot open ({type(e).__name__}: "
                                      f"{text.splitlines()[0][:200]})") from None
    if sqlite is not None:
        _sqlite_tune(storage.engine)
    return storage


def make_pruner(name: str, budget: int):
    """The Optuna pruner `search.pruner` names (trials stopped early on their epoch curves)."""
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


def open_study(storage, name: str, pruner, identity: dict, url: str, directions=None):
    """The study `name` (created if new; `directions` for a multi-objective one). A study that
    belongs to another search (other learner, target or objectives) is refused: sharing it would
    mix incomparable trials."""
    import optuna
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True, pruner=pruner,
                                **({"directions": directions} if directions else {"direction": "maximize"}))
    old = study.user_attrs.get("pocketflow")
    if old is None:
        study.set_user_attr("pocketflow", to_builtin(identity))
    elif {k: old.get(k) for k in identity} != identity:
        raise PocketFlowError(f"study '{name}' in {redact_url(url)} belongs to another search (learner "
                              f"{old.get('learner')}, target {old.get('metric')} {old.get('ratio')}x"
                              + (f", objectives {old['objectives']}" if old.get("objectives") else "") + "); "
                              "set search.study_name to start a new one")
    return study
