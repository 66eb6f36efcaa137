"""An opened study: the Optuna storage and study, the output-folder lock, the MLflow parent run, the
evaluator, and this process's view of the trial records. Every later step works on a `StudySession`.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from xlstm_tune import __version__
from xlstm_tune.errors import UserError
from xlstm_tune.study.plan import StudyPlan
from xlstm_tune.study.records import measured
from xlstm_tune.study.storage import StudyLock, open_storage


@dataclass
class StudySession:
    plan: StudyPlan
    out: TextIO
    err: TextIO
    storage: Any = None
    study: Any = None
    lock: StudyLock | None = None
    tracker: Any = None
    evaluator: Any = None
    parent_run_id: str | None = None
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_ids: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    new_trials: int = 0
    grid_done: bool = False
    mlflow_warned: bool = False
    meta_has_worker: bool = False
    sessions: list[dict[str, Any]] | None = None  # run_meta.json's history of invocations
    judge_impl: Any = None
    progress: Any = None

    @property
    def experiment_name(self) -> str:
        return f"xlstm_tune/{self.plan.name}"

    def remember(self, rec: dict[str, Any]) -> None:
        """Keep a finished trial's record; a measured one answers later trials of the same configuration."""
        self.records[rec["number"]] = rec
        if measured(rec) and rec.get("key"):
            self.by_key.setdefault(rec["key"], rec)

    def sorted_records(self) -> list[dict[str, Any]]:
        return [self.records[n] for n in sorted(self.records)]

    def completed(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    @property
    def device_summary(self) -> dict[str, Any]:
        info = self.evaluator is not None and self.evaluator.info
        if info and info.get("device_summary"):
            return dict(info["device_summary"])
        prev = self.plan.previous_meta
        if prev and prev.get("device_summary"):
            return dict(prev["device_summary"])
        return {"device": self.plan.caps.get("device", "")}

    def prompt_text(self) -> str | None:
        """The text the saved continuations follow (the decode prompt, decoded by the model's tokenizer)."""
        info = self.evaluator is not None and self.evaluator.info
        if info and info.get("decode_prompt_text") is not None:
            return info["decode_prompt_text"]
        prev = self.plan.previous_meta
        if prev and isinstance(prev.get("prompt"), str):
            return prev["prompt"]
        return self.plan.prompt.text


def open_session(plan: StudyPlan, out: TextIO | None = None, err: TextIO | None = None) -> StudySession:
    """Open the storage, lock the study folder, create or load the Optuna study, start the MLflow parent."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = StudySession(plan=plan, out=out or sys.stdout, err=err or sys.stderr, notes=list(plan.notes))
    s.storage = open_storage(plan.opts.storage, plan.out_dir)
    s.lock = StudyLock(plan.files.root, plan.name).acquire()
    try:
        _open_study(s)
        _start_parent(s)
    except BaseException:
        s.lock.release()
        raise
    return s


def _open_study(s: StudySession) -> None:
    import optuna

    from xlstm_tune.study.samplers import make_sampler

    p = s.plan
    p.files.ensure_dirs()
    sampler = make_sampler(p.sampler_name, seed=p.spec.study["seed"], n_objectives=len(p.objectives),
                           n_trials=p.n_trials, grid=p.space.grid() if p.sampler_name == "grid" else None,
                           options=p.spec.sampler)
    directions = ["maximize"] * len(p.objectives)
    try:
        s.study = optuna.create_study(storage=s.storage, study_name=p.name, directions=directions,
                                      sampler=sampler, load_if_exists=True)
    except Exception as exc:
        raise UserError(f"cannot create or load study {p.name!r} in {p.storage_label}: {exc}") from None
    if len(s.study.directions) != len(directions):
        raise UserError(f"study {p.name!r} in {p.storage_label} has {len(s.study.directions)} objective(s), "
                        f"this run has {len(directions)} ({p.objectives}): use a new --study-name")
    if s.study.metric_names != p.objectives:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            s.study.set_metric_names(list(p.objectives))  # the dashboard and plots name the axes


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _start_parent(s: StudySession) -> None:
    from xlstm_tune.tracking.mlflow_log import StudyTracker, default_artifact_root

    p = s.plan
    try:
        s.tracker = StudyTracker(p.tracking_uri, s.experiment_name, default_artifact_root(p.out_dir))
        params: dict[str, Any] = {}
        _flatten("", p.spec.to_dict(), params)
        params = {k: v for k, v in params.items() if k != "source"}
        s.parent_run_id = s.tracker.start_parent(
            p.name, params=params,
            tags={"xlstm_tune.version": __version__, "objectives": ",".join(p.objectives),
                  "sampler": p.sampler_name, "device": p.caps.get("device", ""),
                  "model": p.spec.model["name"], "replay": str(p.src is not None).lower(),
                  "mlflow.note.content": f"xlstm_tune study {p.name}: {p.spec.source}"})
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot use the MLflow store {p.tracking_uri} ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:200]}): check --tracking-uri") from None
