"""The run directory's lifecycle: one owner at a time, nothing lost on --force, recovery after a kill.

`runs/<name>/` is owned by one process for the whole run: `runs/.<name>.lock` is flock'ed (the
kernel drops the lock when the process dies, even by SIGKILL, so a stale lock cannot exist).
Nothing in the directory is touched until every check has passed (`RunDir.open` only reads).
With --force the old run is renamed to `runs/.<name>.replaced` when the new run starts writing
(`begin`), put back if the new run fails (`abort`) and deleted once it has finished (`commit`);
a start that finds `.<name>.replaced` (a --force run killed half-way) settles it first.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

from pocketflow.errors import PocketFlowError
from pocketflow.io import atomic_replace_dir, fsync_dir, make_temp_dir


class RunDir:
    """The run directory `base/name` of one run. Only its `owner` (Horovod rank 0) acts; for the
    other ranks every method is a no-op."""

    def __init__(self, path, resume: bool = False, force: bool = False, owner: bool = True):
        self.path = Path(path)
        self.resume, self.force, self.owner = resume, force, owner
        name = self.path.name
        self.lock_path = self.path.with_name(f".{name}.lock")
        self.aside = self.path.with_name(f".{name}.replaced")   # the old run while --force replaces it
        self.failed = self.path.with_name(f".{name}.failed")    # a failed new run on its way out
        self._fd: int | None = None
        self._moved = False

    def _has_run(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def open(self) -> None:
        """Check everything about the directory and lock it; writes nothing inside it."""
        if not self.owner:
            return
        if self.resume and not self._has_run() and not self.aside.exists():
            raise PocketFlowError(f"run directory {self.path} does not exist, so there is nothing to resume; "
                                  "run without --resume to start it")
        check_writable(self.path.parent)
        self._fd = lock(self.lock_path, f"run directory {self.path}")
        try:
            self._settle()
            if self._has_run() and not (self.resume or self.force):
                raise PocketFlowError(f"run directory {self.path} already exists; use --resume to continue it "
                                      "or --force to start over")
            if self.resume and not self._has_run():
                raise PocketFlowError(f"run directory {self.path} is empty, so there is nothing to resume; "
                                      "run without --resume to start it")
        except BaseException:
            self.release()
            raise

    def _settle(self) -> None:
        """Finish what a killed --force run left: a finished new run stays, otherwise the old comes back."""
        if self.failed.exists():
            shutil.rmtree(self.failed, ignore_errors=True)
        if not self.aside.exists():
            return
        if (self.path / "best" / "metrics.json").is_file():  # the new run finished; only the cleanup was lost
            shutil.rmtree(self.aside)
            return
        if self.path.exists():
            os.replace(self.path, self.failed)
        os.replace(self.aside, self.path)
        fsync_dir(self.path.parent)
        shutil.rmtree(self.failed, ignore_errors=True)
        print(f"run directory: put back the previous run in {self.path} (a --force run was stopped before "
              "it finished)", flush=True)

    def begin(self) -> None:
        """The new run starts writing: move an old run aside (--force), clear a killed run's leftovers."""
        if not self.owner:
            return
        if self.force and self._has_run():
            os.replace(self.path, self.aside)
            self._moved = True
            fsync_dir(self.path.parent)
        self.path.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.path)

    def abort(self) -> None:
        """The new run failed: drop it and put the old run (if --force moved one) back."""
        if not self._moved:
            return
        if self.path.exists():
            os.replace(self.path, self.failed)
        os.replace(self.aside, self.path)
        fsync_dir(self.path.parent)
        self._moved = False
        shutil.rmtree(self.failed, ignore_errors=True)

    def commit(self) -> None:
        """The new run finished: the old one (if any) can go."""
        if self._moved:
            shutil.rmtree(self.aside, ignore_errors=True)
            self._moved = False

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_writable(base: Path) -> None:
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=base, prefix=".write-test.", delete=True)
        probe.close()
    except OSError as e:
        raise PocketFlowError(f"output directory {base} is not writable ({e.strerror})") from None


def lock(path: Path, what: str) -> int:
    """An exclusive flock on `path` (created if needed); refuses, naming the holder, if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise PocketFlowError(f"{what} is in use by another pocketflow process ({holder}); wait for it "
                                  "to finish or use another --output or name") from None
        raise PocketFlowError(f"{what}: cannot lock {path} ({e.strerror})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold a run directory's lock for a change outside a run (e.g. `pocketflow export` into best/)."""
    fd = lock(Path(run_dir).with_name(f".{Path(run_dir).name}.lock"), f"run directory {run_dir}")
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def editing_best(run_dir: Path):
    """Yield a copy of `run_dir/best` to change; it replaces best/ in one rename when the block ends
    (a failure or a kill leaves best/ as it was; the copy is cleared by the next start)."""
    best = Path(run_dir) / "best"
    staging = make_temp_dir(run_dir, ".best.")
    try:
        shutil.copytree(best, staging, dirs_exist_ok=True, symlinks=True)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_replace_dir(staging, best)


def clean_leftovers(run_dir: Path) -> None:
    """Undo what a killed process left half-done: staging dirs, a best/ swapped out but not in."""
    best, old = run_dir / "best", run_dir / ".best.old"
    if not best.exists() and old.exists():
        os.replace(old, best)
    for p in run_dir.glob(".best.*"):
        shutil.rmtree(p, ignore_errors=True)
    for pattern in (".*.tmp", ".*.keras"):  # temp files of pocketflow.io's atomic writes
        for p in run_dir.rglob(pattern):
            p.unlink(missing_ok=True)


def find_run_dir(path) -> Path | None:
    """The run directory a model path belongs to (RUN, RUN/best/model.keras, ...), or None."""
    p = Path(path).absolute()
    for d in ([p] if p.is_dir() else []) + [p.parent, p.parent.parent]:
        if (d / "config.yaml").is_file() and ((d / "best").is_dir() or (d / "baseline").is_dir()):
            return d
    return None
