"""The confirmation round: the top candidates against the default configuration, interleaved
(statistics in study.confirm), its result saved beside the study and applied to the trials' records
and MLflow runs. A round with the same signature already on file is reused, not re-measured.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from xlstm_tune.runtime.best_file import write_json_atomic
from xlstm_tune.study import confirm as confirm_mod
from xlstm_tune.study.export import confirm_path, read_confirm
from xlstm_tune.study.progress import Progress
from xlstm_tune.study.session import StudySession
from xlstm_tune.study.space import knob_key
from xlstm_tune.study.worker import WorkerFailure
from xlstm_tune.tracking.provenance import now_iso


def default_entry(s: StudySession) -> dict[str, Any]:
    space = s.plan.space
    knobs = space.canonical(space.default_knobs())
    key = knob_key(knobs)
    trials = sorted(n for n, r in s.records.items() if r.get("key") == key and r.get("state") == "COMPLETE")
    return {"key": key, "knobs": knobs, "trials": trials}


def run_confirmation(s: StudySession) -> dict[str, Any] | None:
    """The round's data (None: the worker could not run it)."""
    p = s.plan
    c = p.spec.confirm
    lens = p.spec.context_lens
    mode = confirm_mod.selection_mode(p.objectives)
    default = default_entry(s)
    cands = confirm_mod.select_candidates(s.sorted_records(), confirm_mod.criteria(p.objectives, lens), c["top_k"],
                                          c["max_candidates"], default["key"])
    replay = p.src is not None
    sig = confirm_mod.signature(default["key"], cands, c["rounds"], c["repeats"], rule=c) + f";mode={mode};replay={replay}"
    existing = read_confirm(p.files)
    if existing is not None and existing.get("signature") == sig:
        return existing
    if replay:
        summary = confirm_mod.replay_round(s.evaluator.records_by_key(), default, cands, lens, rule=c)
    else:
        configs = [{"key": e["key"], "knobs": e["knobs"]} for e in [default, *cands]]
        s.err.write(f"Confirmation round: {len(cands)} candidate(s) against the default, "
                    f"{c['rounds']} interleaved round(s)...\n")
        s.err.flush()
        raw = None
        progress = Progress(False, 0, 0, p.name, s.err)  # plain lines: a long round says what it measures
        progress.section("confirmation")
        s.evaluator.listener = progress
        try:
            for attempt in (1, 2):
                try:
                    raw = s.evaluator.confirm(configs, c["rounds"], c["repeats"])
                    break
                except WorkerFailure as f:
                    s.notes.append(f"confirmation round attempt {attempt} failed ({f.reason}: {f.message})")
        finally:
            s.evaluator.listener = None
        if raw is None:
            return None
        summary = confirm_mod.summarize_round(raw, default, cands, lens, rule=c)
    base = summary["configs"][0]
    if mode == "balanced" and (base.get("error") or not base.get("decode")):
        mode = "prefill"
    chosen = confirm_mod.choose_best(summary, lens, mode)
    contexts = confirm_mod.best_contexts(summary, chosen, s.records, mode)
    data = {"signature": sig, "mode": mode, "replay": replay, "rounds": c["rounds"], "repeats": c["repeats"],
            "time": now_iso(), "summary": summary, "contexts": contexts}
    write_json_atomic(confirm_path(p.files), data)
    apply_confirmation(s, data)
    return data


def apply_confirmation(s: StudySession, data: Mapping[str, Any]) -> None:
    """Confirmed figures and speed-ups onto the confirmed trials' records and MLflow runs (the files
    get them from the saved round: study.views)."""
    from xlstm_tune.study.views import confirmation_extras

    for n, extra in confirmation_extras(data, s.plan.spec.context_lens).items():
        if n not in s.records:
            continue
        s.records[n].update(extra)
        run_id = s.run_ids.get(n)
        if run_id:
            try:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                s.tracker.client.log_batch(run_id, metrics=[
                    Metric(k, float(v), now, 0) for k, v in extra.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)])
                s.tracker.client.set_tag(run_id, "confirmed", "true")
            except Exception:  # noqa: BLE001 - the files hold it either way
                pass
