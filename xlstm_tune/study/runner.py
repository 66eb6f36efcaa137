"""The study command: sample knobs with Optuna, measure them in an isolated worker, record everything.

    result = run_study(StudyOptions(experiment="experiments/quickstart.toml"))

One call, in this order, each step in a module of its own:

1. **Plan** (study.plan, no side effects): read the spec, probe the device and the model, resolve the
   search space, the objectives and the sampler, check the prompt, the storage URL and the tracking URI,
   and check that an existing study of the same name was measured the same way.
2. **Open** (study.session): the Optuna storage (a journal under `--out-dir` by default), the study (new,
   or joined: any number of processes may work on one study), the MLflow experiment and parent run.
3. **Reconcile** (study.ownership): the trials of processes that died (study.liveness) are finished from
   their record or re-queued once; a process never touches a trial another live process runs.
4. **Trials** (study.trial_loop) until the study holds `n_trials` COMPLETE trials in total (study.slots):
   ask -> check -> measure -> record (study.recording: the Optuna storage first, the source of truth;
   then its views, study.views: the MLflow child run, trials.jsonl, summary.csv).
5. **Confirm** (study.confirmation) the top candidates against the default configuration, interleaved.
6. **Wrap up** (study.wrapup): best.json, the final files, the parent run, plots, report.md, the summary.
"""
from __future__ import annotations

import time
from typing import TextIO

from xlstm_tune.study.confirmation import run_confirmation
from xlstm_tune.study.evaluator import WorkerEvaluator, make_evaluator
from xlstm_tune.study.options import StudyOptions, StudyResult
from xlstm_tune.study.ownership import reconcile
from xlstm_tune.study.plan import StudyPlan, effective_objectives, make_plan
from xlstm_tune.study.session import StudySession, open_session
from xlstm_tune.study.storage import FolderLock
from xlstm_tune.study.views import write_file_views
from xlstm_tune.study.trial_loop import run_loop
from xlstm_tune.study.wrapup import (
    busy_note,
    export_best,
    final_files,
    parent_wrapup,
    paths,
    plots_and_report,
    summary_text,
    write_meta,
)

StudyRun = StudySession  # what study.fleet is handed: the opened study of the launching process

__all__ = ["busy_note", "StudyRun", "StudyOptions", "StudyResult", "StudyPlan", "StudySession", "WorkerEvaluator", "effective_objectives",
           "run_study"]


def _queue_first_trials(s: StudySession) -> None:
    """Queue what the study measures before its sampler draws (study.plan.first_trials): on a fresh study
    the default and the [study] enqueue entries, then the --warm-start seeds not tried or queued yet.
    Under the storage mutex: of processes starting together, one queues them."""
    from xlstm_tune.study.plan import first_trials

    p = s.plan
    grid = p.sampler_name == "grid"
    if grid and p.warm_seeds:
        s.notes.append("--warm-start is not used with the grid sampler: it measures every configuration")
    with s.mutex:  # type: ignore[union-attr]
        trials = s.study.get_trials(deepcopy=False)
        fresh = not trials  # a resumed or joined study has its first trials in its storage
        if fresh and grid and p.enqueued:
            s.notes.append("[study] enqueue is not used with the grid sampler: it measures every configuration")
            fresh = False
        if fresh and p.space.params_for(p.space.default_knobs()) is None:
            s.notes.append("the default configuration is outside the search space: it is measured in the "
                           "confirmation round only")
        tried = []
        for t in trials:
            try:
                tried.append(p.space.params_key(t.params or t.system_attrs.get("fixed_params") or {}))
            except Exception:  # noqa: BLE001 - a partial param set cannot match a seed
                continue
        queue = first_trials(p.space, p.enqueued, [] if grid else p.warm_seeds, fresh=fresh, tried=tried)
        for params, attrs in queue:
            s.study.enqueue_trial(params, user_attrs=attrs)
    added = sum(1 for _, attrs in queue if "origin" in attrs)
    if added:
        s.notes.append(f"warm start: {added} configuration(s) enqueued as the first trials "
                       f"({', '.join(sorted({seed.origin.split(' (')[0] for _, seed in p.warm_seeds}))})")


def _run(s: StudySession) -> StudyResult:
    reconcile(s)
    write_meta(s)
    _queue_first_trials(s)
    o = s.plan.opts
    if o.devices or o.ray_address:
        from xlstm_tune.study.fleet import run_fleet

        before = s.completed()
        try:
            s.fleet_report = run_fleet(s)  # type: ignore[arg-type]
        finally:  # every worker has stopped (also on Ctrl-C): whatever a dead worker left RUNNING
            reconcile(s)
            s.new_trials += max(0, s.completed() - before)
    run_loop(s)
    if o.trials_only:
        final_files(s)
        write_meta(s)
        return StudyResult(s.plan.name, s.completed(), s.sorted_records(), [], paths(s), None, s.new_trials, "")
    s.sync()
    t_confirm = time.monotonic()
    data = run_confirmation(s)
    s.confirm_s = time.monotonic() - t_confirm
    contexts = list(data["contexts"]) if data else []
    best_path = None
    final_files(s)
    for ctx in contexts:
        ctx["mlflow_run_id"] = s.run_ids.get(ctx.get("trial_number")) or ctx.get("mlflow_run_id")
    write_meta(s, final=True)
    with FolderLock(s.plan.files.root):  # processes sharing an --out-dir write these one at a time
        if contexts:
            best_path = export_best(s)
        plots_and_report(s)
    parent_wrapup(s, contexts)
    text = summary_text(s, contexts, data)
    s.out.write(text + "\n")
    s.out.flush()
    return StudyResult(s.plan.name, s.completed(), s.sorted_records(), contexts, paths(s), best_path,
                       s.new_trials, text)


def rebuild_views(s: StudySession) -> StudyResult:
    """trials.jsonl, summary.csv and every missing MLflow child run, rebuilt from the storage alone."""
    from xlstm_tune.study.recording import log_mlflow

    s.sync()
    with s.mutex:  # type: ignore[union-attr]
        try:
            runs = s.tracker.find_trial_runs()
        except Exception:  # noqa: BLE001
            runs = {}
        s.run_ids.update({n: r.info.run_id for n, r in runs.items() if r.info.status in ("FINISHED", "FAILED")})
        logged = [n for n in sorted(s.records) if n not in s.run_ids]
        for n in logged:
            log_mlflow(s, s.records[n])
    rows = write_file_views(s.plan, s.study, s.run_ids)
    text = (f"study {s.plan.name}: {len(rows)} finished trial(s) from {s.plan.storage_label} -> "
            f"{s.plan.files.trials_path}, {s.plan.files.summary_path}; {len(logged)} MLflow child run(s) logged")
    s.out.write(text + "\n")
    s.out.flush()
    return StudyResult(s.plan.name, s.completed(), s.sorted_records(), [], paths(s), None, 0, text)


def run_study(opts: StudyOptions, out: TextIO | None = None, err: TextIO | None = None) -> StudyResult:
    """Run (or resume, or join) a study; see the module docstring."""
    s = open_session(make_plan(opts), out, err)
    status = "FAILED"
    try:
        if opts.rebuild_views:
            result = rebuild_views(s)
        else:
            s.evaluator = make_evaluator(s.plan)
            result = _run(s)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            if s.evaluator is not None:
                s.evaluator.close()
        finally:
            if s.tracker is not None and s.tracker.parent_run_id is not None \
                    and not opts.trials_only:  # a fleet's parent run is the launcher's to end
                try:
                    s.tracker.end_parent(status)
                except Exception:  # noqa: BLE001
                    pass
            s.close()
