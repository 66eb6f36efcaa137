"""Trial records: one flat JSON object per finished trial (trials.jsonl, summary.csv, MLflow, Optuna attrs).

A record carries the seed system's columns (`backend, workers, heads_per_band, chunk_size, prefill_tok_s,
decode_tok_s, prefill_s, decode_s`) plus every other knob, per-length prefill figures
(`prefill_tok_s_ctx<L>` with `_p20`, `_p80`, `_cv`, `_n`), decode spread, compile time, fidelity, the trial
state and its failure reason. `prefill_tok_s` is the geometric mean over the context lengths.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from xlstm_tune.runtime.options import KNOBS

FINAL_STATES = ("COMPLETE", "FAIL", "PRUNED")
FIDELITY_KEYS = ("max_abs_err", "rel_err", "max_rel_err", "kl_mean", "kl_max", "greedy_agreement")
# Optuna user attributes copied from the record (the dashboard shows them per trial).
USER_ATTR_METRICS = ("prefill_tok_s", "decode_tok_s", "fidelity_rel_err", "compile_s")


def objective_value(metrics: Mapping[str, Any], objective: str) -> float:
    value = metrics.get(objective)
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
    return f


def objective_values(metrics: Mapping[str, Any], objectives: Sequence[str]) -> list[float]:
    return [objective_value(metrics, o) for o in objectives]


def build_record(
    number: int,
    *,
    state: str,
    params: Mapping[str, Any],
    knobs: Mapping[str, Any],
    compile: bool,
    key: str,
    outcome: Mapping[str, Any] | None = None,
    failure_reason: str | None = None,
    error: str | None = None,
    error_type: str | None = None,
    traceback: str | None = None,
    objectives: Sequence[str] = (),
    context_lens: Sequence[int] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One trial's record. `outcome` is the measurement (metrics, fidelity, stats, flags, outputs...)."""
    outcome = dict(outcome or {})
    rec: dict[str, Any] = {"number": int(number), "state": state}
    for k in KNOBS:
        rec[k] = knobs.get(k)
    rec["compile"] = bool(compile)
    rec["key"] = key
    rec["params"] = dict(params)
    rec["context_lens"] = list(context_lens)
    rec["context_len"] = max(context_lens) if context_lens else None
    metrics = dict(outcome.get("metrics") or {})
    rec.update(metrics)
    rec.update(outcome.get("quality") or {})  # text metrics, perplexity, judge scores
    fid = dict(outcome.get("fidelity") or {})
    for k in FIDELITY_KEYS:
        if k in fid:
            rec[f"fidelity_{k}"] = fid[k]
    if fid:
        rec["fidelity_passed"] = bool(fid.get("passed"))
        rec["fidelity_rel_tol"] = fid.get("rel_tol")
    if state == "COMPLETE":
        feasible = bool(fid.get("passed", False))
        rec["feasible"] = feasible
        rel, tol = fid.get("rel_err"), fid.get("rel_tol")
        try:
            rec["constraint"] = float(rel) - float(tol)  # type: ignore[arg-type]
            if not math.isfinite(rec["constraint"]):
                rec["constraint"] = 1.0
        except (TypeError, ValueError):
            rec["constraint"] = 1.0
        if not feasible and failure_reason is None:
            failure_reason = "fidelity"
        rec["objective_values"] = objective_values(metrics, objectives)
    else:
        rec["feasible"] = False
    rec["failure_reason"] = failure_reason
    rec["error"] = error
    rec["error_type"] = error_type
    if traceback:
        rec["traceback"] = traceback[-4000:]
    for k in ("flags", "stats", "outputs", "duration_s", "worker_pid", "peak_mem_mb", "duplicate_of",
              "replayed_from", "runtime", "stage_s", "stage_figures", "phases"):
        if k in outcome and outcome[k] not in (None, [], {}):
            rec[k] = outcome[k]
    for k, v in (extra or {}).items():
        if v is not None:
            rec[k] = v
    return rec


def is_feasible(rec: Mapping[str, Any]) -> bool:
    return rec.get("state") == "COMPLETE" and bool(rec.get("feasible"))


def measured(rec: Mapping[str, Any]) -> bool:
    """A COMPLETE trial that measured (not answered from another trial's record)."""
    return rec.get("state") == "COMPLETE" and rec.get("duplicate_of") is None


def user_attrs(rec: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna user attributes for a trial: the whole record (the study's source of truth), the knobs that
    ran, and a few headline figures for the dashboard.

    `knobs` holds the canonical values (what ran, as report.md, summary.csv and MLflow show them); the
    trial's Optuna params stay the raw sampled values the sampler needs (a knob the backend ignores may
    differ there, e.g. `workers` of the native backend)."""
    attrs: dict[str, Any] = {"record": _json_ready(rec), "knobs": {k: rec.get(k) for k in KNOBS},
                             "config_key": rec.get("key"), "constraint": rec.get("constraint", 1.0),
                             "failure_reason": rec.get("failure_reason"), "feasible": bool(rec.get("feasible"))}
    for k in USER_ATTR_METRICS:
        if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool) and math.isfinite(rec[k]):
            attrs[k] = rec[k]
    for k, v in rec.items():
        if k.startswith("prefill_tok_s_ctx") and k.count("_") == 3 and isinstance(v, (int, float)):
            attrs[k] = v
    return attrs


def _json_ready(value: Any) -> Any:
    from xlstm_tune.tracking.study_files import json_safe

    return json_safe(value)


def mlflow_payload(rec: Mapping[str, Any], *, device: Mapping[str, Any] | None = None,
                   sampler: str | None = None) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """(params, metrics, tags) for a trial's MLflow child run."""
    params: dict[str, Any] = {k: rec.get(k) for k in KNOBS}
    params["compile"] = rec.get("compile")
    sampled = rec.get("params") or {}
    for k, v in sampled.items():
        if rec.get(k) != v:
            params[f"sampled_{k}"] = v
    metrics: dict[str, float] = {}
    skip = {"number", "worker_pid", "study_pid"}
    for k, v in rec.items():
        if k in skip or k in KNOBS:
            continue
        if isinstance(v, bool):
            metrics[k] = 1.0 if v else 0.0
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            metrics[k] = float(v)
    tags: dict[str, Any] = {
        "trial_state": rec.get("state"),
        "feasible": str(bool(rec.get("feasible"))).lower(),
        "failure_reason": rec.get("failure_reason") or "",
        "config_key": rec.get("key", ""),
    }
    if rec.get("decode_path"):
        tags["decode_path"] = rec["decode_path"]
    if rec.get("error"):
        tags["error"] = str(rec["error"])[:500]
        tags["error_type"] = rec.get("error_type") or ""
    if rec.get("duplicate_of") is not None:
        tags["duplicate_of"] = str(rec["duplicate_of"])
    if rec.get("replayed_from") is not None:
        tags["replayed_from"] = str(rec["replayed_from"])
    for k in ("phases", "stage_s"):  # where the trial's time went (study.timesplit), per phase and stage
        for name, v in (rec.get(k) or {}).items():
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                metrics[f"{'phase' if k == 'phases' else 'stage_s'}_{name}"] = float(v)
    if rec.get("state") == "PRUNED":
        tags["pruned"] = "true"
        tags["pruned_stage"] = rec.get("pruned_stage") or ""
        tags["prune_reason"] = str(rec.get("prune_reason") or rec.get("error") or "")[:500]
    if rec.get("origin"):
        tags["origin"] = str(rec["origin"])[:500]
    if rec.get("flags"):
        tags["flags"] = "; ".join(rec["flags"])[:2000]
    if device:
        tags["device"] = device.get("device", "")
        tags["device_name"] = device.get("device_name", "")
        tags["torch_version"] = device.get("torch_version", "")
    if sampler:
        tags["sampler"] = sampler
    return params, metrics, tags
