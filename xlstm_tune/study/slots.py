"""How many trials may still start, and the one ask that takes a slot.

`n_trials` is the study's total, shared by every process working on it: a process asks for a trial only
while COMPLETE + RUNNING < n_trials, so the study ends with exactly n_trials COMPLETE trials (a trial
that fails frees its slot). Counting and asking happen under the storage mutex, together with the
trial's owner stamp, its first heartbeat and its configuration claim, so two processes never take the
same slot or start the same configuration: a process whose configuration is already RUNNING elsewhere
waits for that trial's record instead of measuring it again (study.trial_loop.measure).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from xlstm_tune.study.liveness import HEARTBEAT_ATTR, OWNER_ATTR, uses_optuna_heartbeat
from xlstm_tune.study.ownership import reap_stale
from xlstm_tune.study.session import StudySession

CLAIM_ATTR = "xlstm_tune:key"  # the configuration a RUNNING trial measures
DONE = "done"  # the study has n_trials COMPLETE trials
WAIT = "wait"  # every slot is taken by a running trial: ask again later


def first_beat(s: StudySession, trial_id: int) -> None:
    import time

    if uses_optuna_heartbeat(s.storage):
        s.storage.record_heartbeat(trial_id)
    else:
        s.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())


def take_slot(s: StudySession, prepare: Callable[[Any], Any]) -> Any:
    """DONE, WAIT, or `prepare(trial)` for a newly asked trial owned by this process; `prepare` returns
    an object whose `key` (None for a combination that cannot run) is claimed for the trial."""
    from optuna.trial import TrialState

    with s.mutex:  # type: ignore[union-attr]
        reap_stale(s)
        states = [t.state for t in s.study.get_trials(deepcopy=False)]
        complete = states.count(TrialState.COMPLETE)
        running = states.count(TrialState.RUNNING)
        if complete >= s.plan.n_trials:
            return DONE
        if complete + running >= s.plan.n_trials:
            return WAIT
        with warnings.catch_warnings():  # Optuna's heartbeat outside optimize(): we beat ourselves
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = s.study.ask()
        s.storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, s.owner)
        first_beat(s, trial._trial_id)
        prepared = prepare(trial)
        s.storage.set_trial_system_attr(trial._trial_id, CLAIM_ATTR, getattr(prepared, "key", None))
        return prepared


def running_claimant(s: StudySession, key: str, number: int) -> Any:
    """The lowest-numbered trial of another process RUNNING the same configuration, started before ours."""
    from optuna.trial import TrialState

    others = [t for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
              if t.number < number and t.system_attrs.get(CLAIM_ATTR) == key
              and t.system_attrs.get(OWNER_ATTR) != s.owner]
    return min(others, key=lambda t: t.number) if others else None
