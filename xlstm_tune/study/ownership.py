"""Reconcile a study left by a killed process, before this process asks for a trial.

A trial left RUNNING whose result reached trials.jsonl is finished from that record (nothing is measured
twice); one without a result is marked FAIL (`interrupted`) and its settings are re-queued. Every
finished trial gets its trials.jsonl line and its MLflow child run if it lacks them.
"""
from __future__ import annotations

from typing import Any

from xlstm_tune.study.records import build_record
from xlstm_tune.study.recording import log_mlflow, set_attrs, tell, write_summary_csv
from xlstm_tune.study.session import StudySession
from xlstm_tune.study.space import knob_key


def interrupted_record(s: StudySession, t: Any) -> dict[str, Any]:
    """The FAIL record of a trial whose process stopped while it ran."""
    p = s.plan
    knobs = p.space.knobs_from_params(t.params)
    try:
        knobs = p.space.canonical(knobs)
    except Exception:  # noqa: BLE001 - a partial param set; keep what we have
        pass
    return build_record(
        t.number, state="FAIL", params=t.params, knobs=knobs, compile=p.spec.model["compile"],
        key=knob_key(knobs), failure_reason="interrupted",
        error="the study process stopped while this trial ran; its settings were re-queued",
        error_type="Interrupted", objectives=p.objectives, context_lens=p.spec.context_lens,
    )


def requeue(s: StudySession, t: Any) -> None:
    """Enqueue a trial's params again unless an identical one is already waiting."""
    from optuna.trial import TrialState

    if not t.params:
        return
    for w in s.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if w.system_attrs.get("fixed_params") == t.params:
            return
    s.study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})


def reconcile(s: StudySession) -> None:
    import optuna
    from optuna.trial import TrialState

    files = s.plan.files
    for rec in files.read_trials():
        s.remember(rec)
    on_file = dict(s.records)
    for t in s.study.get_trials(deepcopy=False):
        rec = on_file.get(t.number)
        if t.state == TrialState.RUNNING:
            trial = optuna.trial.Trial(s.study, t._trial_id)
            if rec is not None and rec.get("state") in ("COMPLETE", "FAIL", "PRUNED"):
                set_attrs(s, t._trial_id, rec)  # measured and recorded, never told: finish it
                tell(s, trial, rec)
                s.notes.append(f"trial {t.number} was measured before the last run stopped: finished from its record")
            else:
                rec = interrupted_record(s, t)
                files.append_trial(rec)
                s.remember(rec)
                set_attrs(s, t._trial_id, rec)
                tell(s, trial, rec)
                requeue(s, t)
        elif t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) and rec is None:
            stored = t.user_attrs.get("record")
            if isinstance(stored, dict) and stored.get("number") == t.number:
                rec = dict(stored)
            else:  # failed by Optuna itself (e.g. Ctrl-C inside tell): treat as interrupted
                rec = interrupted_record(s, t)
                rec["state"] = t.state.name
                if t.state == TrialState.FAIL:
                    requeue(s, t)
            files.append_trial(rec)
            s.remember(rec)
    # MLflow: every finished trial has exactly one finished child run
    finished = {n for n, r in s.records.items() if r.get("state") in ("COMPLETE", "FAIL", "PRUNED")}
    try:
        runs = s.tracker.find_trial_runs()
    except Exception:  # noqa: BLE001
        runs = {}
    for n, run in runs.items():
        if run.info.status in ("FINISHED", "FAILED"):
            s.run_ids[n] = run.info.run_id
    for n in sorted(finished - set(s.run_ids)):
        log_mlflow(s, s.records[n])
    if s.records:
        write_summary_csv(s)
