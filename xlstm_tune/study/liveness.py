"""Who runs a trial, and whether that process still lives.

Every trial a process asks for is stamped with its owner, `host:pid:start-token` (the start token is the
process's start time, so a reused pid is not mistaken for the owner), in the trial system attribute
`xlstm_tune:owner`. While the trial is measured the owner sends heartbeats:

- RDB storages (sqlite, PostgreSQL, ...): Optuna's own heartbeat (`RDBStorage(heartbeat_interval=,
  grace_period=)`, recorded by Optuna's heartbeat thread); stale trials are the ones Optuna reports.
- the journal storage (Optuna 5.0's `JournalStorage` has no heartbeat): the owner rewrites the system
  attribute `xlstm_tune:heartbeat` (wall-clock seconds) every interval; a trial is stale when that is
  older than the grace period.

An owner on this host whose process is gone (or whose pid now belongs to another process) is dead at
once, without waiting for the grace period: a study killed and started again resumes immediately.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

OWNER_ATTR = "xlstm_tune:owner"
HEARTBEAT_ATTR = "xlstm_tune:heartbeat"
DEFAULT_HEARTBEAT_S = 10
DEFAULT_GRACE_S = 60


def _start_token(pid: int) -> str | None:
    try:
        import psutil

        return f"{psutil.Process(pid).create_time():.2f}"
    except Exception:  # noqa: BLE001 - no such process (or no permission to look)
        return None


def this_owner() -> str:
    """This process as a trial owner: `host:pid:start-token`."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_token(os.getpid())}"


def owner_dead_here(owner: str | None) -> bool:
    """True when `owner` is a process of this host that no longer runs; False when alive or elsewhere."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid_text, _, token = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    return _start_token(int(pid_text)) != token


@dataclass(frozen=True)
class HeartbeatPolicy:
    """Heartbeat interval and grace period, in seconds."""

    interval_s: int = DEFAULT_HEARTBEAT_S
    grace_s: int = DEFAULT_GRACE_S


def uses_optuna_heartbeat(storage: Any) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


class TrialHeartbeat:
    """Heartbeats for one trial while it is measured (a context manager; stop it before `tell`)."""

    def __init__(self, storage: Any, trial_id: int, policy: HeartbeatPolicy) -> None:
        self.storage, self.trial_id, self.policy = storage, trial_id, policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        import optuna

        optuna_hb = uses_optuna_heartbeat(self.storage)
        while True:
            try:
                if optuna_hb:
                    self.storage.record_heartbeat(self.trial_id)
                else:
                    self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # finished (by us or, after a grace period, by another process)
            except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                pass
            if self._stop.wait(self.policy.interval_s):
                return

    def __enter__(self) -> "TrialHeartbeat":
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.trial_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def stale_trial_ids(study: Any, policy: HeartbeatPolicy, me: str) -> set[int]:
    """Ids of RUNNING trials of other processes that are dead: gone from this host, silent past the grace
    period (Optuna's heartbeat on RDB storages, the heartbeat attribute on the journal), or never stamped
    with an owner (a process stamps its trial under the storage mutex, in the same step that asks for it,
    so an unstamped RUNNING trial was left by a process that died there, or by an older version)."""
    from optuna.trial import TrialState

    storage = study._storage
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.system_attrs.get(OWNER_ATTR) != me]
    stale = {t._trial_id for t in running
             if t.system_attrs.get(OWNER_ATTR) is None or owner_dead_here(t.system_attrs.get(OWNER_ATTR))}
    if uses_optuna_heartbeat(storage):
        return stale | (set(storage._get_stale_trial_ids(study._study_id)) & {t._trial_id for t in running})
    now = time.time()
    for t in running:
        beat = t.system_attrs.get(HEARTBEAT_ATTR)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if beat is None or now - float(beat) > policy.grace_s:
            stale.add(t._trial_id)
    return stale
