"""Atomic file writes: temp file in the same directory + fsync + rename.

A reader (or a resumed run after SIGKILL) only ever sees the old or the new file,
never a half-written one. The file gets the mode a plain `open(path, "w")` would give it
(0666 less the umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def _proc_umask() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_once() -> int:
    """Without /proc the umask can only be read by setting it: once, at import."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _proc_umask()
if _IMPORT_UMASK is None:
    _IMPORT_UMASK = _umask_once()


def umask() -> int:
    """The process umask, read without changing it (/proc/self/status), else as at import."""
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


def make_temp_dir(parent, prefix: str) -> Path:
    """mkdtemp with the mode os.mkdir would give (mkdtemp's is 0700): it becomes a visible dir."""
    d = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(d, 0o777 & ~umask())
    return d


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_path(path, suffix: str = ".tmp"):
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    mode = 0o666 & ~umask()  # what open(path, 'w') would give; mkstemp's is 0600
    try:
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), mode)  # the writer (Keras) may have made a file of its own
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> Path:
    with _atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(to_builtin(obj), indent=2, sort_keys=True) + "\n")


def atomic_save_model(model, path) -> Path:
    """Save a Keras model as `.keras` atomically (Keras itself writes in place)."""
    with _atomic_path(path, suffix=".keras") as tmp:  # Keras insists on the .keras suffix
        model.save(tmp)
    return Path(path)


def atomic_replace_dir(staging: Path, final: Path) -> Path:
    """Swap a fully written staging directory into place; the old one goes away last."""
    staging, final = Path(staging), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return final


def to_builtin(obj):
    """numpy scalars/arrays (e.g. from scikit-optimize) -> plain Python for JSON/YAML."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


@contextlib.contextmanager
def quiet_stderr(fds=(2,)):
    """Silence native code writing to fd 2 (TF's CUDA probes, the TFLite converter's MLIR dumps)
    so users see only PocketFlow's own messages; POCKETFLOW_DEBUG=1 keeps everything."""
    if os.environ.get("POCKETFLOW_DEBUG"):
        yield
        return
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    with tempfile.TemporaryFile() as sink:
        for fd in fds:
            os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, s in zip(fds, saved):
                os.dup2(s, fd)
                os.close(s)


def redact_url(url: str | None) -> str | None:
    """Hide the password of a storage URL before it is printed or written anywhere."""
    if not url or "://" not in url:
        return url
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))
