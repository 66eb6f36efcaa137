"""The study command: sample knobs with Optuna, measure them in an isolated worker, record everything.

    result = run_study(StudyOptions(experiment="experiments/quickstart.toml"))

One call, in this order, each step in a module of its own:

1. **Plan** (study.plan, no side effects): read the spec, probe the device and the model, resolve the
   search space, the objectives and the sampler, check the prompt, the storage URL and the tracking URI,
   and check that an existing study of the same name was measured the same way.
2. **Open** (study.session): the Optuna storage (a journal under `--out-dir` by default), an exclusive
   lock on the study directory, the MLflow experiment and the study's parent run.
3. **Reconcile** (study.ownership) a study left by a killed process.
4. **Trials** (study.trial_loop) until `n_trials` trials are COMPLETE in total: ask -> check -> measure ->
   record (study.recording: Optuna user attrs + tell, trials.jsonl, MLflow child run, summary.csv).
5. **Confirm** (study.confirmation) the top candidates against the default configuration, interleaved.
6. **Wrap up** (study.wrapup): best.json, the final files, the parent run, plots, report.md, the summary.
"""
from __future__ import annotations

from typing import TextIO

from xlstm_tune.study.confirmation import run_confirmation
from xlstm_tune.study.evaluator import WorkerEvaluator, make_evaluator
from xlstm_tune.study.options import StudyOptions, StudyResult
from xlstm_tune.study.ownership import reconcile
from xlstm_tune.study.plan import StudyPlan, effective_objectives, make_plan
from xlstm_tune.study.session import StudySession, open_session
from xlstm_tune.study.trial_loop import run_loop
from xlstm_tune.study.wrapup import (
    export_best,
    final_files,
    parent_wrapup,
    paths,
    plots_and_report,
    summary_text,
    write_meta,
)

__all__ = ["StudyOptions", "StudyResult", "StudyPlan", "StudySession", "WorkerEvaluator", "effective_objectives",
           "run_study"]


def _seed_queue(s: StudySession) -> None:
    """A fresh study measures the default configuration first, then the spec's [study] enqueue entries."""
    p = s.plan
    if s.study.trials:
        return  # a resumed study has them in its storage
    if p.sampler_name == "grid" and p.enqueued:
        s.notes.append("[study] enqueue is not used with the grid sampler: it measures every configuration")
        return
    params = p.space.params_for(p.space.default_knobs())
    if params is not None:
        s.study.enqueue_trial(params, user_attrs={"baseline": True})
    else:
        s.notes.append("the default configuration is outside the search space: it is measured in the "
                       "confirmation round only")
    for params in p.enqueued:
        s.study.enqueue_trial(params, user_attrs={"enqueued": True})


def _run(s: StudySession) -> StudyResult:
    reconcile(s)
    write_meta(s)
    _seed_queue(s)
    run_loop(s)
    data = run_confirmation(s)
    contexts = list(data["contexts"]) if data else []
    best_path = None
    for ctx in contexts:
        ctx["mlflow_run_id"] = s.run_ids.get(ctx.get("trial_number")) or ctx.get("mlflow_run_id")
    final_files(s)
    write_meta(s, final=True)
    if contexts:
        best_path = export_best(s)
    parent_wrapup(s, contexts)
    plots_and_report(s)
    text = summary_text(s, contexts, data)
    s.out.write(text + "\n")
    s.out.flush()
    return StudyResult(s.plan.name, s.completed(), s.sorted_records(), contexts, paths(s), best_path,
                       s.new_trials, text)


def run_study(opts: StudyOptions, out: TextIO | None = None, err: TextIO | None = None) -> StudyResult:
    """Run (or resume) a study; see the module docstring."""
    s = open_session(make_plan(opts), out, err)
    s.evaluator = make_evaluator(s.plan)
    status = "FAILED"
    try:
        result = _run(s)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            s.evaluator.close()
        finally:
            if s.tracker is not None and s.tracker.parent_run_id is not None:
                try:
                    s.tracker.end_parent(status)
                except Exception:  # noqa: BLE001
                    pass
            if s.lock is not None:
                s.lock.release()
