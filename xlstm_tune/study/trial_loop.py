"""The trial loop: ask -> check the combination -> measure -> record -> tell, until the study has
`n_trials` COMPLETE trials in total (so re-running a finished study does nothing).

`measure` asks the evaluator (or answers from an identical configuration already measured, or from the
replayed record); `recording.finish_trial` finishes every record, whatever the outcome. The worker
process loads the model once; any crash fails just that trial.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.study.ownership import requeue
from xlstm_tune.study.progress import Progress
from xlstm_tune.study.records import build_record
from xlstm_tune.study.recording import best_text, finish_trial
from xlstm_tune.study.session import StudySession
from xlstm_tune.study.space import knob_key
from xlstm_tune.study.worker import WorkerFailure
from xlstm_tune.tracking.provenance import now_iso

MAX_UNRUNNABLE_IN_A_ROW = 200  # sampled combinations that could not run (invalid / not recorded) in a row
QUALITY_PREFIXES = ("distinct_", "repetition_rate", "perplexity", "continuation_tokens", "judge_")


def outcome_from_record(rec: dict[str, Any]) -> dict[str, Any]:
    """A measured record as an evaluator outcome (a later trial of the same configuration reuses it)."""
    metrics = {k: v for k, v in rec.items()
               if k.startswith(("prefill_", "decode_", "compile_s")) and not isinstance(v, (dict, list))}
    fidelity = {k.removeprefix("fidelity_"): v for k, v in rec.items() if k.startswith("fidelity_")}
    quality = {k: v for k, v in rec.items() if k.startswith(QUALITY_PREFIXES)}
    return {"state": "COMPLETE", "metrics": metrics, "fidelity": fidelity, "quality": quality,
            "flags": rec.get("flags") or [], "duration_s": 0.0}


def judge(s: StudySession, outcome: dict[str, Any]) -> None:
    """Score the trial's saved continuation with the configured judge (scores go into the record)."""
    q = s.plan.spec.quality
    path = (outcome.get("outputs") or {}).get("continuation")
    if q["judge"] == "none" or not path or "judge_overall" in (outcome.get("quality") or {}):
        return
    from xlstm_tune.quality.judges import make_judge

    if s.judge_impl is None:
        s.judge_impl = make_judge(q["judge"], q["judge_url"], q["judge_model"])
    text = Path(path).read_text(encoding="utf-8", errors="replace")  # as the worker wrote it
    result = s.judge_impl.judge(s.prompt_text() or "", text)
    scores = {k: v for k, v in result.to_dict(prefix="judge_").items() if k != "judge_raw"}
    outcome["quality"] = {**(outcome.get("quality") or {}), **scores}


def measure(s: StudySession, number: int, knobs: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The outcome for one configuration: from an identical measured trial, else from the evaluator
    (None: a replay that never recorded it). Raises WorkerFailure for a trial the worker could not finish."""
    if key in s.by_key:
        src = s.by_key[key]
        outcome = outcome_from_record(src)
        outcome["duplicate_of"] = src["number"]
        return outcome
    return s.evaluator.evaluate(number, knobs, s.plan.faults.get(number))


def run_trial(s: StudySession) -> dict[str, Any]:
    """Ask for one trial, measure it and finish its record; returns the record."""
    p = s.plan
    trial = s.study.ask()
    number = trial.number
    params = p.space.suggest(trial)
    raw = p.space.knobs_from_params(params)
    extra: dict[str, Any] = {"sampler": p.sampler_name,
                             "requeued_from": trial.user_attrs.get("requeued_from"),
                             "is_default": None,
                             "baseline": True if trial.user_attrs.get("baseline") else None,
                             "started_at": now_iso()}
    common = dict(params=params, compile=p.spec.model["compile"], objectives=p.objectives,
                  context_lens=p.spec.context_lens)
    reason = p.space.check(raw)
    if reason is not None:
        rec = build_record(number, state="PRUNED", knobs=raw, key=knob_key(raw),
                           failure_reason="invalid_combination", error=reason, extra=extra, **common)
        finish_trial(s, trial, rec)
        return rec
    knobs = p.space.canonical(raw)
    key = knob_key(knobs)
    if key == p.default_key:
        extra["is_default"] = True  # the default configuration (quality.report reads this)
    s.progress.running(number, knobs)
    t0 = time.perf_counter()
    try:
        outcome = measure(s, number, knobs, key)
    except WorkerFailure as f:
        rec = build_record(number, state="FAIL", knobs=knobs, key=key, failure_reason=f.reason, error=f.message,
                           error_type=f.error_type, traceback=f.detail,
                           extra=dict(extra, duration_s=time.perf_counter() - t0, finished_at=now_iso()), **common)
        finish_trial(s, trial, rec)
        return rec
    except (KeyboardInterrupt, UserError) as exc:
        # Ctrl-C, or a replacement worker that cannot start: not this configuration's fault
        why = ("interrupted by the user (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
               else f"the trial worker could not start: {exc}")
        rec = build_record(number, state="FAIL", knobs=knobs, key=key, failure_reason="interrupted",
                           error=f"{why}; the settings were re-queued", error_type=type(exc).__name__,
                           extra=extra, **common)
        finish_trial(s, trial, rec)
        requeue(s, s.study._storage.get_trial(trial._trial_id))
        raise
    if outcome is None:  # replay: this configuration was never measured
        rec = build_record(number, state="PRUNED", knobs=knobs, key=key, failure_reason="not_recorded",
                           error="not in the replayed record", extra=extra, **common)
        finish_trial(s, trial, rec)
        return rec
    extra.update(finished_at=now_iso())
    judge(s, outcome)
    if outcome.get("duration_s") is None:
        outcome["duration_s"] = time.perf_counter() - t0
    outputs = outcome.get("outputs") or {}
    outcome["outputs"] = {k: os.path.relpath(v, p.files.root) for k, v in outputs.items()}
    rec = build_record(number, state="COMPLETE", knobs=knobs, key=key, outcome=outcome, extra=extra, **common)
    values = rec.get("objective_values") or []
    if not values or not all(isinstance(v, float) and math.isfinite(v) for v in values):
        rec = build_record(number, state="FAIL", knobs=knobs, key=key, outcome=outcome, failure_reason="error",
                           error=f"no finite figure for objective(s) {p.objectives}", extra=extra, **common)
    finish_trial(s, trial, rec)
    return rec


def run_loop(s: StudySession) -> None:
    """Trials until the study has n_trials COMPLETE ones, the timeout passes or the grid is exhausted."""
    p = s.plan
    target = p.n_trials
    timeout = p.spec.study["timeout_s"]
    t_start = time.monotonic()
    s.grid_done = False
    completed = s.completed()
    if completed < target and s.evaluator.kind == "worker":
        s.evaluator.start()  # load the model before the first trial: a model that cannot load fails here
    s.progress = Progress(p.opts.progress, target, completed, p.name, s.err)
    unrunnable = 0
    try:
        while completed < target:
            if timeout is not None and time.monotonic() - t_start > timeout:
                s.notes.append(f"stopped after the study timeout of {timeout:g} s with {completed} complete trials")
                break
            if s.grid_done:
                s.notes.append("the grid is exhausted: every grid point has been tried")
                break
            rec = run_trial(s)
            if rec["state"] == "COMPLETE":
                completed += 1
                unrunnable = 0
            elif rec["state"] == "PRUNED":
                unrunnable += 1
                if unrunnable >= MAX_UNRUNNABLE_IN_A_ROW:
                    s.notes.append(f"stopped: {unrunnable} sampled combinations in a row could not run "
                                   f"({rec.get('failure_reason')})")
                    break
            s.progress.done(rec, completed, best_text(s))
    finally:
        s.progress.close()
