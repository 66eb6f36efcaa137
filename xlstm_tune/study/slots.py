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
from xlstm_tune.study.ownership import reap_stale, requeue
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

    unstarted = None  # a trial asked here and not yet handed over: put back if we are stopped meanwhile
    try:
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
                unstarted = s.study.ask()
            trial = unstarted
            s.storage.set_trial_system_attr(trial._trial_id, OWNER_ATTR, s.owner)
            first_beat(s, trial._trial_id)
            prepared = prepare(trial)
            s.storage.set_trial_system_attr(trial._trial_id, CLAIM_ATTR, getattr(prepared, "key", None))
            unstarted = None
            return prepared
    except BaseException as exc:
        if unstarted is not None:  # outside the mutex: recording takes it where it needs it
            put_back_unstarted(s, unstarted, exc)
        raise


def put_back_unstarted(s: StudySession, trial: Any, exc: BaseException) -> None:
    """A trial this process asked for and lost before it measured anything (`exc`), e.g. stopped by
    Ctrl-C or SIGTERM while its parameters were being sampled: recorded FAIL by its own process
    (`interrupted` for a stop, `error` otherwise), and its configuration queued again when it was a
    queued one (its fixed params: a warm start, an enqueue entry; a sampled one needs no copy, the sampler
    draws again). Without this the trial would stay RUNNING until reaped, re-queued with partial params."""
    from xlstm_tune.study.recording import finish_trial
    from xlstm_tune.study.views import interrupted_record

    t = s.storage.get_trial(trial._trial_id)
    if t.state.is_finished():
        return
    rec = interrupted_record(s.plan, t)
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        rec["error"] = "the study was stopped before this trial measured anything; a queued configuration is re-queued"
    else:
        rec.update(failure_reason="error", error_type=type(exc).__name__,
                   error=f"the trial could not start: {exc}"[:2000])
    if finish_trial(s, trial, rec):
        fixed = t.system_attrs.get("fixed_params")
        if fixed and rec["failure_reason"] == "interrupted":
            requeue(s, t, dict(fixed))


def running_claimant(s: StudySession, key: str, number: int) -> Any:
    """The lowest-numbered trial of another process RUNNING the same configuration, started before ours."""
    from optuna.trial import TrialState

    others = [t for t in s.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
              if t.number < number and t.system_attrs.get(CLAIM_ATTR) == key
              and t.system_attrs.get(OWNER_ATTR) != s.owner]
    return min(others, key=lambda t: t.number) if others else None
