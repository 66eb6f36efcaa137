"""The trial loop: take a slot (ask) -> check the combination -> measure -> record -> tell, until the
study holds `n_trials` COMPLETE trials in total, counted over every process that works on it (so
re-running a finished study does nothing).

Hook points: `measure` is where a trial's measurement is requested (from an identical configuration
already measured, one being measured by another process, or the evaluator); `recording.finish_trial`
is where every record is finished, whatever the outcome. The worker process loads the model once; any
crash fails just that trial. While a trial runs, its heartbeat (study.liveness) tells the other
processes that its owner lives.
"""
from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.study import pruning
from xlstm_tune.study.liveness import TrialHeartbeat
from xlstm_tune.study.ownership import reap_stale, requeue
from xlstm_tune.study.progress import Progress
from xlstm_tune.study.records import build_record
from xlstm_tune.study.recording import best_text, finish_trial
from xlstm_tune.study.session import StudySession
from xlstm_tune.study.slots import DONE, WAIT, running_claimant, take_slot
from xlstm_tune.study.space import knob_key
from xlstm_tune.study.worker import WorkerFailure
from xlstm_tune.tracking.provenance import now_iso

MAX_UNRUNNABLE_IN_A_ROW = 200  # sampled combinations that could not run (invalid / not recorded) in a row
POLL_S = 1.0  # how often a waiting process looks at the storage again
QUALITY_PREFIXES = ("distinct_", "repetition_rate", "perplexity", "continuation_tokens", "judge_")


@dataclass
class AskedTrial:
    """A trial this process owns, with its sampled params and (if it can run) its canonical knobs."""

    trial: Any
    params: dict[str, Any]
    raw: dict[str, Any]
    knobs: dict[str, Any] | None
    key: str | None
    invalid: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    limits: tuple[Any, float | None, float | None] = (None, None, None)  # prune_limits() when it started

    @property
    def number(self) -> int:
        return int(self.trial.number)


def _ran_by() -> dict[str, Any]:
    """Which process ran a trial: host, pid and (in a fleet) the worker's label, for the record."""
    import socket

    return {"study_host": socket.gethostname(), "study_pid": os.getpid(),
            "fleet_worker": os.environ.get("XLSTM_TUNE_FLEET_WORKER") or None}


def prepare(s: StudySession, trial: Any) -> AskedTrial:
    """Sample the trial's params and resolve them to knobs (runs under the storage mutex)."""
    p = s.plan
    params = p.space.suggest(trial)
    raw = p.space.knobs_from_params(params)
    history = s.storage.get_trial(trial._trial_id).system_attrs.get("retry_history") or []
    extra: dict[str, Any] = {"sampler": p.sampler_name,
                             "requeued_from": history[-1] if history else trial.user_attrs.get("requeued_from"),
                             "is_default": None,
                             "baseline": True if trial.user_attrs.get("baseline") else None,
                             "origin": trial_origin(trial.user_attrs, history),
                             "owner": s.owner,
                             "started_at": now_iso(), **_ran_by()}
    invalid = p.space.check(raw)
    if invalid is not None:
        return AskedTrial(trial, params, raw, None, None, invalid, extra)
    knobs = p.space.canonical(raw)
    key = knob_key(knobs)
    if key == p.default_key:
        extra["is_default"] = True  # the default configuration (quality.report reads this)
    return AskedTrial(trial, params, raw, knobs, key, None, extra)


def trial_origin(attrs: dict[str, Any], history: list[Any]) -> str | None:
    """Where a trial's configuration came from when not from the sampler (report.md lists these)."""
    base = None
    if attrs.get("origin"):
        base = str(attrs["origin"])  # a warm start (study.warm_start)
    elif attrs.get("baseline"):
        base = "default configuration"
    elif attrs.get("enqueued"):
        base = "[study] enqueue"
    requeued = history[-1] if history else attrs.get("requeued_from")
    if requeued is not None:  # a retry carries its first trial's attributes: say both
        return f"re-queued from trial {requeued}" + (f" ({base})" if base else "")
    return base


def prune_limits(s: StudySession) -> tuple[dict[str, Any] | None, float | None, float | None]:
    """(pruning limits, soft time limit, hard time limit) for the next trial, from the study so far."""
    p = s.plan
    records = list(s.records.values())
    limits = pruning.thresholds(records, p.objectives, p.rule)
    soft = pruning.time_limit_s(records, p.rule)
    hard = None
    if soft is not None:  # one stage may overrun the soft limit; past twice it the worker is killed
        hard = min(float(p.spec.trial["timeout_s"]), max(2.0 * soft, soft + 60.0))
    return limits, soft, hard


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


def _duplicate(s: StudySession, key: str) -> dict[str, Any] | None:
    s.sync()
    src = s.by_key.get(key)
    if src is None:
        return None
    outcome = outcome_from_record(src)
    outcome["duplicate_of"] = src["number"]
    return outcome


def _wait_for(s: StudySession, number: int, key: str, stop: threading.Event) -> None:
    """Wait while another process measures the same configuration (reaping it if its owner dies)."""
    while running_claimant(s, key, number) is not None:
        if stop.wait(POLL_S):
            return
        with s.mutex:  # type: ignore[union-attr]
            reap_stale(s)


def measure(s: StudySession, asked: AskedTrial) -> dict[str, Any] | None:
    """The outcome for one configuration: from an identical measured trial (of any process), else from
    the evaluator (None: a replay that never recorded it). Raises WorkerFailure for a trial the worker
    could not finish."""
    assert asked.key is not None and asked.knobs is not None
    outcome = _duplicate(s, asked.key)
    if outcome is None and running_claimant(s, asked.key, asked.number) is not None:
        _wait_for(s, asked.number, asked.key, threading.Event())
        outcome = _duplicate(s, asked.key)
    if outcome is not None:
        return outcome
    limits, soft, hard = asked.limits
    return s.evaluator.evaluate(asked.number, asked.knobs, s.plan.faults.get(asked.number), prune=limits,
                                time_limit_s=soft, hard_timeout_s=hard)


def _record(s: StudySession, asked: AskedTrial) -> dict[str, Any]:
    """Measure an asked trial and build its record (any outcome)."""
    p = s.plan
    number, knobs, key, extra = asked.number, asked.knobs, asked.key, asked.extra
    common = dict(params=asked.params, compile=p.spec.model["compile"], objectives=p.objectives,
                  context_lens=p.spec.context_lens)
    if asked.invalid is not None:
        return build_record(number, state="PRUNED", knobs=asked.raw, key=knob_key(asked.raw),
                            failure_reason="invalid_combination", error=asked.invalid, extra=extra, **common)
    assert knobs is not None and key is not None
    s.progress.running(number, knobs)
    s.sync()
    if key not in s.by_key and key in s.pruned_by_key:  # answered from the earlier stop: costs nothing
        src = s.pruned_by_key[key]
        return build_record(number, state="PRUNED", knobs=knobs, key=key, failure_reason=src["failure_reason"],
                            extra=dict(extra, duplicate_of=src["number"], pruned_stage=src.get("pruned_stage"),
                                       prune_reason=f"same configuration as #{src['number']}: "
                                                    f"{src.get('prune_reason')}", finished_at=now_iso()), **common)
    asked.limits = prune_limits(s)
    t0 = time.perf_counter()
    try:
        outcome = measure(s, asked)
    except WorkerFailure as f:
        elapsed = time.perf_counter() - t0
        _, soft, hard = asked.limits
        if f.reason == "timeout" and hard is not None and hard < float(p.spec.trial["timeout_s"]):
            return build_record(number, state="PRUNED", knobs=knobs, key=key, failure_reason=pruning.SLOW_REASON,
                                extra=dict(extra, duration_s=elapsed, finished_at=now_iso(), pruned_stage="running",
                                           prune_reason=pruning.slow_reason(elapsed, soft)
                                           or f"killed after {elapsed:.1f} s (the study's time limit)"), **common)
        return build_record(number, state="FAIL", knobs=knobs, key=key, failure_reason=f.reason, error=f.message,
                            error_type=f.error_type, traceback=f.detail,
                            extra=dict(extra, duration_s=elapsed, finished_at=now_iso()), **common)
    if outcome is None:  # replay: this configuration was never measured
        return build_record(number, state="PRUNED", knobs=knobs, key=key, failure_reason="not_recorded",
                            error="not in the replayed record", extra=extra, **common)
    extra = dict(extra, finished_at=now_iso())
    if outcome.get("state") == "PRUNED":  # stopped early by the worker (study.pruning)
        if outcome.get("duration_s") is None:
            outcome["duration_s"] = time.perf_counter() - t0
        return build_record(number, state="PRUNED", knobs=knobs, key=key, outcome=outcome,
                            failure_reason=outcome.get("failure_reason") or pruning.PRUNED_REASON,
                            extra=dict(extra, pruned_stage=outcome.get("pruned_stage"),
                                       prune_reason=outcome.get("prune_reason")), **common)
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
    return rec


def run_trial(s: StudySession, asked: AskedTrial) -> dict[str, Any] | None:
    """Measure one asked trial and finish its record; returns the record (None: another process
    finished the trial first)."""
    p = s.plan
    try:
        with TrialHeartbeat(s.storage, asked.trial._trial_id, s.policy):
            rec = _record(s, asked)
    except (KeyboardInterrupt, UserError) as exc:
        # Ctrl-C, or a replacement worker that cannot start: not this configuration's fault
        why = ("interrupted by the user (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
               else f"the trial worker could not start: {exc}")
        knobs = asked.knobs or asked.raw
        rec = build_record(asked.number, state="FAIL", knobs=knobs, key=asked.key or knob_key(knobs),
                           failure_reason="interrupted", error=f"{why}; the settings were re-queued",
                           error_type=type(exc).__name__, extra=asked.extra, params=asked.params,
                           compile=p.spec.model["compile"], objectives=p.objectives, context_lens=p.spec.context_lens)
        if finish_trial(s, asked.trial, rec):
            requeue(s, s.storage.get_trial(asked.trial._trial_id))
        raise
    return rec if finish_trial(s, asked.trial, rec) else None


def run_loop(s: StudySession) -> None:
    """Trials until the study has n_trials COMPLETE ones, the timeout passes or the grid is exhausted."""
    p = s.plan
    target = p.n_trials
    timeout = p.spec.study["timeout_s"]
    t_start = time.monotonic()
    s.grid_done = False
    s.progress = Progress(p.opts.progress, target, s.completed(), p.name, s.err, timeout_s=timeout)
    s.evaluator.listener = s.progress  # the worker's phase messages (study.worker)
    if s.completed() < target and s.evaluator.kind == "worker":
        s.evaluator.start()  # load the model before the first trial: a model that cannot load fails here
    idle = threading.Event()  # never set: a bounded wait between looks at the storage
    unrunnable = 0
    try:
        while True:
            if timeout is not None and time.monotonic() - t_start > timeout:
                s.notes.append(f"stopped after the study timeout of {timeout:g} s with {s.completed()} complete trials")
                break
            if s.grid_done:
                s.notes.append("the grid is exhausted: every grid point has been tried")
                break
            asked = take_slot(s, lambda trial: prepare(s, trial))
            if asked is DONE:
                break
            if asked is WAIT:
                idle.wait(POLL_S)
                continue
            rec = run_trial(s, asked)
            if rec is None:
                continue
            if rec["state"] == "COMPLETE":
                unrunnable = 0
            elif rec["state"] == "PRUNED" and (rec.get("duplicate_of") is not None or rec.get("failure_reason")
                                               not in (pruning.PRUNED_REASON, pruning.SLOW_REASON)):
                unrunnable += 1  # nothing was measured: an invalid, unrecorded or already pruned sample
                if unrunnable >= MAX_UNRUNNABLE_IN_A_ROW:
                    s.notes.append(f"stopped: {unrunnable} sampled combinations in a row could not run "
                                   f"({rec.get('failure_reason')})")
                    break
            s.progress.done(rec, s.completed(), best_text(s))
    finally:
        s.evaluator.listener = None
        s.progress.close()
