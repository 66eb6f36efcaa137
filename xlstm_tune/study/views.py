"""trials.jsonl, summary.csv and the MLflow child runs are views of the Optuna storage.

The storage holds each finished trial's whole record (user attribute `record`, written before the trial
is told); this module turns the storage's trials back into records and writes the views from them, so
any view can be deleted and rebuilt (`python -m xlstm_tune study --rebuild-views ...`). A finished trial
without a record (its process died while it ran, and another process failed it) is shown as
`interrupted`. The confirmation round's figures (study.confirmation) are added to the trials it measured.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xlstm_tune.study.plan import StudyPlan
from xlstm_tune.study.records import FINAL_STATES, build_record, measured
from xlstm_tune.study.space import knob_key

RECORD_ATTR = "record"


def interrupted_record(plan: StudyPlan, t: Any, state: str = "FAIL") -> dict[str, Any]:
    """The record of a trial whose process stopped while it ran."""
    knobs = plan.space.knobs_from_params(t.params)
    try:
        knobs = plan.space.canonical(knobs)
    except Exception:  # noqa: BLE001 - a partial param set; keep what we have
        pass
    return build_record(
        t.number, state=state, params=t.params, knobs=knobs, compile=plan.spec.model["compile"],
        key=knob_key(knobs), failure_reason="interrupted",
        error="the study process stopped while this trial ran; its settings were re-queued",
        error_type="Interrupted", objectives=plan.objectives, context_lens=plan.spec.context_lens,
    )


def stored_record(t: Any) -> dict[str, Any] | None:
    """The record a trial carries in the storage (None if it has none, or one of another trial)."""
    rec = t.user_attrs.get(RECORD_ATTR)
    if isinstance(rec, dict) and rec.get("number") == t.number and rec.get("state") in FINAL_STATES:
        return dict(rec)
    return None


def record_of(plan: StudyPlan, t: Any) -> dict[str, Any] | None:
    """A finished trial's record as the views show it (None for a trial still waiting or running)."""
    if not t.state.is_finished():
        return None
    rec = stored_record(t)
    if rec is None or rec["state"] != t.state.name:
        return interrupted_record(plan, t, t.state.name)
    return rec


def records_from_storage(plan: StudyPlan, study: Any) -> dict[int, dict[str, Any]]:
    """Trial number -> record, for every finished trial of the study."""
    out: dict[int, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False):
        rec = record_of(plan, t)
        if rec is not None:
            out[t.number] = rec
    return out


def measured_by_key(records: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Configuration key -> the first trial that measured it."""
    out: dict[str, dict[str, Any]] = {}
    for n in sorted(records):
        rec = records[n]
        if measured(rec) and rec.get("key"):
            out.setdefault(rec["key"], dict(rec))
    return out


def pruned_by_key(records: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Configuration key -> the first trial early stopping stopped (the front only improves: it stays pruned)."""
    from xlstm_tune.study.pruning import PRUNED_REASON, SLOW_REASON

    out: dict[str, dict[str, Any]] = {}
    for n in sorted(records):
        rec = records[n]
        if rec.get("state") == "PRUNED" and rec.get("duplicate_of") is None and rec.get("key") \
                and rec.get("failure_reason") in (PRUNED_REASON, SLOW_REASON):
            out.setdefault(rec["key"], dict(rec))
    return out


def confirmation_extras(data: Mapping[str, Any] | None, context_lens: list[int]) -> dict[int, dict[str, Any]]:
    """Trial number -> the confirmed figures and speed-ups of the configuration it measured."""
    import math

    if not data:
        return {}
    out: dict[int, dict[str, Any]] = {}
    for e in data["summary"]["configs"]:
        extra: dict[str, Any] = {"confirmed": True, "confirm_role": e["role"]}
        for n in context_lens:
            st = e["prefill"].get(str(n))
            if st:
                extra[f"confirm_prefill_tok_s_ctx{n}"] = st["median"]
            if e["speedup_prefill"].get(str(n)) is not None:
                extra[f"speedup_prefill_ctx{n}"] = e["speedup_prefill"][str(n)]
        if e.get("decode"):
            extra["confirm_decode_tok_s"] = e["decode"]["median"]
        if e.get("speedup_decode") is not None:
            extra["speedup_decode"] = e["speedup_decode"]
        pre = [v for v in e["speedup_prefill"].values() if v]
        extra["speedup_vs_default"] = {
            "prefill_tok_s": math.exp(sum(math.log(v) for v in pre) / len(pre)) if pre else None,
            "decode_tok_s": e.get("speedup_decode")}
        for n in e.get("trials", []):
            out[int(n)] = extra
    return out


def view_records(plan: StudyPlan, study: Any, run_ids: Mapping[int, str]) -> list[dict[str, Any]]:
    """The rows of trials.jsonl: the storage's records, confirmation figures, MLflow run ids."""
    from xlstm_tune.study.export import read_confirm

    records = records_from_storage(plan, study)
    extras = confirmation_extras(read_confirm(plan.files), plan.spec.context_lens)
    rows = []
    for n in sorted(records):
        rec = dict(records[n], **extras.get(n, {}))
        if n in run_ids:
            rec["mlflow_run_id"] = run_ids[n]
        rows.append(rec)
    return rows


def _summary_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: v for k, v in rec.items() if k not in ("traceback", "params")}
    row["sampled_params"] = rec.get("params")  # the sampler's raw values; the knob columns ran
    return row


def write_file_views(plan: StudyPlan, study: Any, run_ids: Mapping[int, str]) -> list[dict[str, Any]]:
    """Rewrite trials.jsonl and summary.csv from the storage (under the study folder's lock, so the last
    writer of processes sharing the folder writes the newest state); returns the rows."""
    from xlstm_tune.study.storage import FolderLock

    with FolderLock(plan.files.root):
        rows = view_records(plan, study, run_ids)
        plan.files.rewrite_trials(rows)
        plan.files.write_summary_csv([_summary_row(r) for r in rows])
    return rows
