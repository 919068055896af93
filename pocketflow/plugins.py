"""Importing the user's modules: custom layers (`model.imports`) and learners or optimizers that
register themselves (`plugins`), found in the working directory as `python -m` would find them."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pocketflow.errors import PocketFlowError


def cwd_on_path() -> None:
    """User modules are found in the working directory, as `python -m` would find them."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def import_modules(modules, key: str = "model.imports") -> None:
    """Import each module named under config key `key`; a failure is one line naming it."""
    cwd_on_path()
    for name in modules or ():
        try:
            importlib.import_module(name)
        except Exception as e:
            raise PocketFlowError(f"{key}: cannot import '{name}' ({type(e).__name__}: {e})") from None
