"""The end of a study: the final trials.jsonl and summary.csv, run_meta.json, best.json, the MLflow
parent run's metrics and artifacts, plots and report.md, and the summary printed on stdout.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xlstm_tune import __version__
from xlstm_tune.errors import storage_fault
from xlstm_tune.study.export import confirm_path
from xlstm_tune.study.recording import best_so_far, write_views
from xlstm_tune.study.report import render
from xlstm_tune.study.session import StudySession, storage_record
from xlstm_tune.study.timesplit import render_lines as time_split_lines


def final_files(s: StudySession) -> None:
    """trials.jsonl and summary.csv from the storage, with every trial's MLflow run id."""
    try:
        for n, run in s.tracker.find_trial_runs().items():
            if run.info.status in ("FINISHED", "FAILED"):
                s.run_ids.setdefault(n, run.info.run_id)
    except Exception:  # noqa: BLE001 - MLflow is a view: the files still get written
        pass
    write_views(s)


def paths(s: StudySession) -> dict[str, str]:
    f = s.plan.files
    return {
        "study dir": str(f.root),
        "trials": str(f.trials_path),
        "summary": str(f.summary_path),
        "best.json": str(f.best_path),
        "run_meta": str(f.run_meta_path),
        "outputs": str(f.outputs_dir),
        "report": str(f.root / "report.md"),
        "plots": str(f.plots_dir),
        "Optuna storage": s.plan.storage_label,
        "MLflow store": s.plan.tracking_uri,
        "MLflow experiment": s.experiment_name,
    }


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def study_time_split(s: StudySession) -> dict[str, Any]:
    """Where the study's time went, over every invocation (study.timesplit); replay: the recorded costs."""
    from xlstm_tune.study.timesplit import time_split

    sessions = s.sessions or []
    walls = [x.get("wall_s") for x in sessions]
    wall = None if s.plan.src is not None or not walls or not all(isinstance(w, (int, float)) for w in walls) \
        else sum(walls)
    return time_split(s.sorted_records(), load_s=sum(float(x.get("load_s") or 0.0) for x in sessions),
                      confirm_s=sum(float(x.get("confirm_s") or 0.0) for x in sessions), wall_s=wall)


def write_meta(s: StudySession, final: bool = False) -> None:
    """run_meta.json: what was run, where it went, and the history of invocations of this study."""
    import optuna

    from xlstm_tune.tracking.provenance import git_commit, host_info, now_iso

    p = s.plan
    prev = p.previous_meta or {}
    if s.sessions is None:
        s.sessions = list(prev.get("sessions") or []) + [{
            "started_at": now_iso(), "pid": os.getpid(), "argv": p.opts.argv,
            "n_trials": p.n_trials, "sampler": p.sampler_name,
            "seed": p.spec.study["seed"], "timeout_s": p.spec.study["timeout_s"]}]
    s.sessions[-1].update(wall_s=time.monotonic() - s.started, confirm_s=s.confirm_s,
                          load_s=float(getattr(s.evaluator, "load_s", 0.0) or 0.0))
    meta = {
        "schema": "xlstm_tune.run_meta/1",
        "study_name": p.name,
        "identity": p.identity,
        "spec": p.spec.to_dict(),
        "objectives": p.spec.objectives,
        "objectives_effective": p.objectives,
        "notes": s.notes,
        "space": p.space.describe(),
        "model_info": p.model_info,
        "capabilities": p.caps,
        "device_summary": s.device_summary,
        "runtime": runtime_in_force(s),
        "prompt": s.prompt_text(),
        "prompt_source": p.prompt.describe(),
        "storage": p.storage_label,
        "storage_record": storage_record(s),
        "tracking_uri": p.tracking_uri,
        "mlflow_experiment": s.experiment_name,
        "mlflow_parent_run_id": s.parent_run_id,
        "replay_source": str(p.src.trials_path) if p.src is not None else None,
        "paths": paths(s),
        "provenance": {**host_info(), "git_commit": git_commit(Path(__file__).resolve().parent),
                       "xlstm_tune_version": __version__, "optuna_version": optuna.__version__,
                       "mlflow_version": _version("mlflow")},
        "created_at": prev.get("created_at") or now_iso(),
        "updated_at": now_iso(),
        "finished": final,
        "sessions": s.sessions,
        "time_split": study_time_split(s),
    }
    p.files.write_run_meta(meta)


def runtime_in_force(s: StudySession) -> dict[str, Any] | None:
    """The worker's settings (compile, dtype, threads, CUDA switches) as it measured with them."""
    info = s.evaluator is not None and s.evaluator.info
    if info and info.get("runtime"):
        return dict(info["runtime"])
    return (s.plan.previous_meta or {}).get("runtime")


def busy_note(records: Any, max_other_cpu: float) -> str | None:
    """The summary's warning when trials were measured on a busy machine (bench/load.py), else None."""
    busy = sorted(r["number"] for r in records if r.get("busy_machine"))
    if not busy:
        return None
    return (f"warning: {len(busy)} trial(s) were measured on a busy machine (other processes took more than "
            f"{max_other_cpu:.0%} of the CPUs, also when re-measured): trials {busy[:10]}"
            f"{' ...' if len(busy) > 10 else ''}; their figures are flagged busy_machine: re-run on an idle "
            f"machine to trust them")


def _same_best(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    strip = lambda d: {**d, "provenance": {k: v for k, v in d.get("provenance", {}).items() if k != "time"}}  # noqa: E731
    return strip(a) == strip(b)


def export_best(s: StudySession) -> Path | None:
    """best.json from the confirmed study; an unchanged winner keeps the file (and its time) as it is."""
    import json

    from xlstm_tune.study.export import build_study_best
    from xlstm_tune.tracking.best_export import export_best as write_best

    files = s.plan.files
    best = build_study_best(files)
    current = None
    if files.best_path.is_file():
        try:
            current = json.loads(files.best_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            current = None
    if current is not None and _same_best(current, best):
        return files.best_path
    return write_best(files.best_path, best)


def parent_wrapup(s: StudySession, contexts: list[dict[str, Any]]) -> None:
    """Study-level metrics and the study's files on the MLflow parent run (a failure only warns)."""
    metrics: dict[str, Any] = {"completed_trials": s.completed(), "trials_total": len(s.records)}
    metrics.update(best_so_far(s))
    for c in contexts:
        m = c["metrics"]
        if m.get("speedup_prefill") is not None:
            metrics[f"best_speedup_prefill_ctx{c['context_len']}"] = m["speedup_prefill"]
        if m.get("speedup_decode") is not None:
            metrics["best_speedup_decode"] = m["speedup_decode"]
    f = s.plan.files
    try:
        s.tracker.log_parent_metrics(metrics, step=len(s.records))
        arts = [x for x in (f.run_meta_path, f.trials_path, f.summary_path, f.best_path, confirm_path(f)) if x.is_file()]
        s.tracker.log_parent_artifacts(arts)
    except Exception as exc:  # noqa: BLE001
        if storage_fault(exc):
            raise
        s.err.write(f"warning: MLflow parent run update failed: {exc}\n")


def plots_and_report(s: StudySession) -> None:
    """plots/ and report.md in the study folder, attached to the parent run; never fails the study."""
    from xlstm_tune.study.plotting import make_study_plots

    p = s.plan
    default = next((r for r in s.records.values() if r.get("is_default")), None)
    try:
        outcome = make_study_plots(p.out_dir, p.name, p.opts.tracking_uri, p.opts.storage, default)
        if outcome.notes:
            s.notes.extend(n for n in outcome.notes if not n.startswith("MLflow:"))
    except Exception as exc:  # noqa: BLE001 - a plotting problem must not cost the measured study
        if storage_fault(exc):
            raise
        s.err.write(f"warning: plots/report not written: {exc}\n")


def summary_text(s: StudySession, contexts: list[dict[str, Any]], data: Mapping[str, Any] | None) -> str:
    """The terminal summary: the table, the winner per context length, notes, paths and next commands."""
    p = s.plan
    o = p.opts
    default = data["summary"]["configs"][0] if data else None  # its knobs are the canonical ones
    if data is None:
        note = None
    elif data.get("replay"):
        note = "from the replayed record, not re-measured"
    else:
        note = f"confirmed: {data['rounds']} interleaved round(s) against the default"
    reason = None
    if not contexts:
        reason = ("no configuration passed the fidelity check in the confirmation round" if data
                  else "no confirmation round (no worker result)")
    hints = [
        "",
        f"Compare runs:   python -m xlstm_tune ui --out-dir {p.out_dir}" + (
            f" --tracking-uri {o.tracking_uri}" if o.tracking_uri else ""),
    ]
    if s.comparison_route:
        hints.append(f"                then open http://127.0.0.1:5000/{s.comparison_route} (the trials side by side)")
    hints += [
        f"Study history:  python -m xlstm_tune dashboard --out-dir {p.out_dir}" + (
            f" --storage {o.storage}" if o.storage else ""),
    ]
    if contexts:
        hints.append(f"Run with it:    python -m xlstm_tune run --best {p.files.best_path}")
    return render({
        "study": p.name,
        "headline": f"{s.new_trials} new trial(s) this run, {s.completed()} complete of "
                    f"{p.n_trials} wanted; objectives {', '.join(p.objectives)}",
        "records": s.sorted_records(),
        "contexts": contexts,
        "default": default,
        "confirmation": data["summary"] if data else None,
        "confirm_note": note,
        "no_best_reason": reason,
        "notes": s.notes + [n for n in (busy_note(s.records.values(), s.plan.spec.bench["max_other_cpu"]),) if n],
        "paths": paths(s),
        "hints": hints,
        "time_split_lines": time_split_lines(study_time_split(s)),
    })
