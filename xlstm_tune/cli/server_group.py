"""Run a server (`mlflow ui`, optuna-dashboard) as a process group this command owns.

`mlflow ui` forks uvicorn and huey workers; a plain child would leave them listening after our
process is stopped. The server starts in its own session (so its group id is its pid), and SIGTERM or
SIGINT to us stops the whole group: SIGTERM first, SIGKILL for whatever is left after a grace period.
Stopping is quiet: no traceback, exit code 0.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence

GRACE_S = 10.0


class _Stop(Exception):
    """Raised by our signal handler to leave the wait for the server."""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member we may not signal is still a member
        return True
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM every process of `proc`'s group, SIGKILL what is still there after `grace_s`."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)  # workers reparented to init: no handle to wait on, only the group to poll
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def serve(cmd: Sequence[str]) -> int:
    """Run `cmd` in its own process group until it exits (its code) or we are told to stop (0)."""

    def _raise(signum: int, frame: object) -> None:
        raise _Stop(signum)

    proc = subprocess.Popen(list(cmd), start_new_session=True)
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    except (_Stop, KeyboardInterrupt):
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        stop_group(proc)
        return 0
    finally:
        if proc.poll() is None or _group_alive(proc.pid):  # also workers a crashed server left behind
            stop_group(proc)
        for s, handler in previous.items():
            signal.signal(s, handler)
