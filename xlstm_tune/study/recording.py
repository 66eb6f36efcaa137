"""Finishing a trial: its record goes to the Optuna storage first (user attributes, constraint, tell:
the source of truth), then to the views (the MLflow child run, trials.jsonl, summary.csv; study.views).
`finish_trial` is the one place a measured trial's record is finished.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xlstm_tune.errors import storage_fault
from xlstm_tune.study.records import is_feasible, mlflow_payload, user_attrs
from xlstm_tune.study.session import StudySession


def set_attrs(s: StudySession, trial_id: int, rec: Mapping[str, Any]) -> None:
    """The record as Optuna user attributes, and the fidelity constraint of a COMPLETE trial."""
    import optuna

    from xlstm_tune.study.samplers import set_constraint

    trial = optuna.trial.Trial(s.study, trial_id)
    for k, v in user_attrs(rec).items():
        trial.set_user_attr(k, v)
    if rec["state"] == "COMPLETE":
        set_constraint(trial, rec.get("constraint", 1.0))


def tell(s: StudySession, trial: Any, rec: Mapping[str, Any]) -> None:
    """Tell Optuna the record's outcome (tolerating GridSampler's stop() outside optimize())."""
    from optuna.trial import TrialState

    kwargs: dict[str, Any]
    if rec["state"] == "COMPLETE":
        kwargs = {"values": list(rec["objective_values"])}
    else:
        kwargs = {"state": TrialState.FAIL if rec["state"] == "FAIL" else TrialState.PRUNED}
    try:
        s.study.tell(trial, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise
        s.grid_done = True


def error_file(s: StudySession, rec: Mapping[str, Any]) -> Path | None:
    """outputs/trial_<n>_error.txt for a failed trial with an error (attached to its MLflow run)."""
    if rec["state"] == "COMPLETE" or not (rec.get("error") or rec.get("traceback")):
        return None
    path = s.plan.files.outputs_dir / f"trial_{rec['number']}_error.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"trial {rec['number']}: {rec['state']} ({rec.get('failure_reason')})\n"
                    f"{rec.get('error_type') or ''}: {rec.get('error') or ''}\n\n{rec.get('traceback') or ''}\n",
                    encoding="utf-8")
    return path


def log_mlflow(s: StudySession, rec: dict[str, Any]) -> None:
    """The trial's MLflow child run (idempotent); a logging failure warns once and never fails the trial."""
    params, metrics, tags = mlflow_payload(rec, device=s.device_summary, sampler=s.plan.sampler_name)
    artifacts = [s.plan.files.root / p for p in (rec.get("outputs") or {}).values()]
    err_file = error_file(s, rec)
    if err_file is not None:
        artifacts.append(err_file)
    try:
        run_id = s.tracker.log_trial(rec["number"], params=params, metrics=metrics, tags=tags,
                                     artifacts=[a for a in artifacts if a.exists()],
                                     status="FAILED" if rec["state"] == "FAIL" else "FINISHED",
                                     started_at=rec.get("started_at"), finished_at=rec.get("finished_at"))
        s.run_ids[rec["number"]] = run_id
        best = best_so_far(s)
        if best:
            s.tracker.log_parent_metrics(best, step=rec["number"])
    except Exception as exc:  # the storage holds the record; `study --rebuild-views` logs it later
        if storage_fault(exc):
            raise  # a full or read-only disk: stop the study (the CLI says so in one line)
        if not s.mlflow_warned:
            s.err.write(f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); the trial is recorded in "
                        f"the Optuna storage and is logged by the next run (or study --rebuild-views)\n")
            s.mlflow_warned = True


def best_so_far(s: StudySession) -> dict[str, float]:
    best: dict[str, float] = {}
    for rec in s.records.values():
        if not is_feasible(rec):
            continue
        for k in ("prefill_tok_s", "decode_tok_s"):
            v = rec.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v) and v > best.get(f"best_{k}", -1.0):
                best[f"best_{k}"] = float(v)
    return best


def best_text(s: StudySession) -> str:
    parts = []
    for k, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
        cands = [r for r in s.records.values() if is_feasible(r) and isinstance(r.get(k), (int, float))]
        if cands:
            r = max(cands, key=lambda r: r[k])
            parts.append(f"best {label} {r[k]:,.0f} tok/s (#{r['number']})")
    return ", ".join(parts) or "no feasible trial yet"


def write_views(s: StudySession) -> None:
    """trials.jsonl and summary.csv from the storage (study.views); this process's records become the
    rows written (with confirmation figures and MLflow run ids)."""
    from xlstm_tune.study.views import measured_by_key, write_file_views

    rows = write_file_views(s.plan, s.study, s.run_ids)
    s.records = {r["number"]: r for r in rows}
    s.by_key = measured_by_key(s.records)


def finish_trial(s: StudySession, trial: Any, rec: dict[str, Any]) -> bool:
    """Storage (record attrs, then tell) -> MLflow child run -> trials.jsonl and summary.csv.

    False when another process finished the trial first (it judged this process dead: a heartbeat
    later than the grace period); the result is then dropped and the trial is that process's to record."""
    import optuna

    from xlstm_tune.study.wrapup import write_meta

    try:
        set_attrs(s, trial._trial_id, rec)
        tell(s, trial, rec)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
        if isinstance(exc, ValueError) and not s.storage.get_trial(trial._trial_id).state.is_finished():
            raise
        s.notes.append(f"trial {rec['number']} was finished by another process (this one missed its heartbeat "
                       f"grace period): its result here is dropped")
        return False
    s.records[rec["number"]] = rec
    log_mlflow(s, rec)
    write_views(s)
    s.new_trials += 1
    if not s.meta_has_worker and getattr(s.evaluator, "info", None):
        s.meta_has_worker = True
        write_meta(s)  # now with the device summary and prompt the worker reported
    return True
