"""Which running trials still have a live worker: heartbeats out, dead workers' trials reaped.

A RUNNING trial whose worker died (same host: its pid is gone; another host: no heartbeat for
GRACE_SECONDS) is failed as "interrupted", does not count against the budget, and its point is
queued again, so a killed worker costs the study nothing but the time it had spent.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings

from pocketflow.hpo.study import GRACE_SECONDS, HEARTBEAT_SECONDS, state


def worker_tag() -> dict:
    """What a trial records about the process running it (read back by `reap`)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


@contextlib.contextmanager
def heartbeat(storage, trial_id: int):
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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead(t, host: str, now: float) -> tuple[bool, str]:
    w = t.user_attrs.get("worker")
    if w is not None:
        dead = w.get("host") == host and (w.get("pid") == os.getpid() or not pid_alive(w.get("pid", 0)))
        return dead, f"interrupted: worker {w.get('host')}:{w.get('pid')} is gone"
    # died between creating the trial and tagging it
    dead = t.datetime_start is not None and now - t.datetime_start.timestamp() > GRACE_SECONDS
    return dead, "interrupted: no worker recorded"


def reap(study, storage, requeue, log) -> None:
    """Fail RUNNING trials whose worker is gone, as 'interrupted', and `requeue(trial)` their
    points; `log(msg)` says so."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # other hosts: heartbeat too old
    host, now = socket.gethostname(), time.time()
    for t in study.get_trials(deepcopy=False, states=(state("RUNNING"),)):
        dead, why = _dead(t, host, now)
        if not dead:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "void", "interrupted")
            storage.set_trial_user_attr(t._trial_id, "fail_reason", why)
            storage.set_trial_state_values(t._trial_id, state=state("FAIL"))
        except UpdateFinishedTrialError:
            continue  # another worker got there first
        log(f"trial {t.number}: {why}; re-running its point")
        requeue(t)
