"""Trial owners and heartbeats on a real journal storage, with real processes as owners.

A RUNNING trial is another process's until that process is gone from this host, silent past the grace
period, or was never stamped; a study run next to such trials reaps exactly the dead ones, re-queues each
once, and leaves a live owner's trial alone.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from xlstm_tune.study.liveness import (  # noqa: E402
    HEARTBEAT_ATTR,
    OWNER_ATTR,
    HeartbeatPolicy,
    TrialHeartbeat,
    owner_dead_here,
    stale_trial_ids,
    this_owner,
)


def _journal(path: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path)))


@pytest.fixture
def sleeper():
    """A live process of this host (killed at teardown)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def _owner_of(pid: int) -> str:
    import psutil

    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.2f}"


def test_owner_liveness_follows_the_process(sleeper: subprocess.Popen) -> None:
    owner = _owner_of(sleeper.pid)
    assert not owner_dead_here(owner) and not owner_dead_here(this_owner())
    assert owner_dead_here(owner.rsplit(":", 1)[0] + ":12.34")  # the pid now belongs to another process
    assert not owner_dead_here("another-host:1:1.00")  # another host: only its heartbeat can tell
    sleeper.kill()
    sleeper.wait(10)
    assert owner_dead_here(owner)


def test_stale_trials_are_the_dead_ones(tmp_path: Path, sleeper: subprocess.Popen) -> None:
    st = optuna.create_study(storage=_journal(tmp_path / "j.journal"), study_name="s")
    policy = HeartbeatPolicy(interval_s=1, grace_s=30)
    now = time.time()
    trials = {}
    for label, owner, beat in [
        ("live_beating", _owner_of(sleeper.pid), now),
        ("live_silent", "another-host:7:1.00", now - 31),   # alive or not, silent past the grace period
        ("remote_beating", "another-host:8:1.00", now - 5),
        ("dead_here", _owner_of(sleeper.pid).rsplit(":", 1)[0] + ":1.00", now),
        ("unstamped", None, None),
        ("mine", this_owner(), now - 1000),
    ]:
        t = st.ask()
        if owner is not None:
            st._storage.set_trial_system_attr(t._trial_id, OWNER_ATTR, owner)
        if beat is not None:
            st._storage.set_trial_system_attr(t._trial_id, HEARTBEAT_ATTR, beat)
        trials[label] = t._trial_id
    stale = stale_trial_ids(st, policy, this_owner())
    assert stale == {trials["live_silent"], trials["dead_here"], trials["unstamped"]}


def test_heartbeat_beats_until_stopped(tmp_path: Path) -> None:
    st = optuna.create_study(storage=_journal(tmp_path / "j.journal"), study_name="s")
    t = st.ask()
    with TrialHeartbeat(st._storage, t._trial_id, HeartbeatPolicy(interval_s=1, grace_s=5)):
        deadline = time.monotonic() + 30
        beats = set()
        while len(beats) < 2 and time.monotonic() < deadline:  # two distinct beats: it keeps beating
            value = st._storage.get_trial(t._trial_id).system_attrs.get(HEARTBEAT_ATTR)
            if value is not None:
                beats.add(value)
            time.sleep(0.1)
        assert len(beats) >= 2
    stopped = st._storage.get_trial(t._trial_id).system_attrs[HEARTBEAT_ATTR]
    st.tell(t, 1.0)  # the thread was joined on exit: no beat can touch the finished trial
    assert st._storage.get_trial(t._trial_id).system_attrs[HEARTBEAT_ATTR] == stopped
    assert st._storage.get_trial(t._trial_id).state.name == "COMPLETE"
