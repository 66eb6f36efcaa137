"""Reconciling trials: a process finishes the trials it owns, and the trials of processes that died.

Run under the storage mutex (study.slots) before every ask, so processes never reconcile the same trial
twice. A RUNNING trial of a dead owner (study.liveness: gone from this host, or no heartbeat within the
grace period) is

- finished from its record when the record reached the storage before its owner died (nothing is
  measured twice), or
- marked FAIL (`interrupted`) and re-queued exactly once (Optuna's RetryHeartbeatStaleTrialCallback,
  `max_retry=1`): only the process whose state change succeeds re-queues it and logs its MLflow run.

A trial RUNNING in a live process is never touched.
"""
from __future__ import annotations

from typing import Any

from xlstm_tune.study.liveness import OWNER_ATTR, owner_dead_here, stale_trial_ids
from xlstm_tune.study.recording import log_mlflow, set_attrs, tell
from xlstm_tune.study.session import StudySession
from xlstm_tune.study.views import interrupted_record, record_of, stored_record


def requeue(s: StudySession, t: Any, params: dict[str, Any] | None = None) -> None:
    """Enqueue a trial's params again (this process's own trial, stopped by Ctrl-C) unless an identical
    one is already waiting. `params` (default: the trial's own) names what to queue, e.g. a queued trial's
    fixed params when it was stopped before all of them were suggested."""
    from optuna.trial import TrialState

    params = t.params if params is None else params
    if not params:
        return
    for w in s.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if w.system_attrs.get("fixed_params") == params or w.params == params:
            return
    s.study.enqueue_trial(dict(params), user_attrs={"requeued_from": t.number})


def reap_stale(s: StudySession) -> list[int]:
    """Finish or fail the RUNNING trials of dead processes; returns their numbers. Call under the mutex."""
    import optuna
    from optuna.trial import TrialState

    storage = s.study._storage
    reaped = []
    for trial_id in sorted(stale_trial_ids(s.study, s.policy, s.owner)):
        t = storage.get_trial(trial_id)
        if t.state != TrialState.RUNNING:
            continue
        rec = stored_record(t)
        try:
            if rec is not None:  # measured and recorded, never told: finish it from its record
                set_attrs(s, trial_id, rec)
                tell(s, t.number, rec)
                s.notes.append(f"trial {t.number} was measured before its process stopped: finished from its record")
            else:
                if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
                s.retry(s.study, storage.get_trial(trial_id))
                rec = interrupted_record(s.plan, t)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile by its owner
        reaped.append(t.number)
        log_mlflow(s, rec)
    return reaped


def log_orphaned_runs(s: StudySession) -> None:
    """MLflow child runs for finished trials whose owner died before logging them (under the mutex)."""
    try:
        runs = s.tracker.find_trial_runs()
    except Exception:  # noqa: BLE001
        runs = {}
    for n, run in runs.items():
        if run.info.status in ("FINISHED", "FAILED"):
            s.run_ids[n] = run.info.run_id
    for t in s.study.get_trials(deepcopy=False):
        if t.number in s.run_ids or not t.state.is_finished():
            continue
        owner = t.system_attrs.get(OWNER_ATTR)
        if owner is None or owner == s.owner or owner_dead_here(owner):
            rec = record_of(s.plan, t)
            if rec is not None:
                log_mlflow(s, rec)


def reconcile(s: StudySession) -> None:
    """At start: reap the dead processes' trials and log the MLflow runs they left unlogged."""
    with s.mutex:  # type: ignore[union-attr]
        reap_stale(s)
        log_orphaned_runs(s)
    s.sync()
