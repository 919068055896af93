"""Named crash points for the crash-safety tests (SIGKILL the process at an exact moment).

`POCKETFLOW_KILL_AT=trial_eval:2` kills the process the 2nd time execution passes
`crash_point("trial_eval")`. Unset (always, for users) it costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("POCKETFLOW_KILL_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
