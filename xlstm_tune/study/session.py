"""An opened study: the Optuna storage and study, the MLflow parent run, the evaluator, and this
process's identity as a trial owner. Every later step works on a `StudySession`.

Opening refuses (one line, nothing written) a storage that does not hold the study this output folder
recorded in run_meta.json (an emptied journal, another `--storage`), and a shared study that was
started with other measurement settings.
"""
from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from xlstm_tune import __version__
from xlstm_tune.errors import UserError, storage_fault
from xlstm_tune.study.liveness import HeartbeatPolicy, this_owner
from xlstm_tune.study.plan import StudyPlan, first_difference
from xlstm_tune.study.storage import StorageMutex, open_storage, storage_identity

STUDY_UID_ATTR = "xlstm_tune:study_uid"
STUDY_IDENTITY_ATTR = "xlstm_tune:identity"


@dataclass
class StudySession:
    plan: StudyPlan
    out: TextIO
    err: TextIO
    owner: str = ""
    policy: HeartbeatPolicy = field(default_factory=HeartbeatPolicy)
    storage: Any = None
    study: Any = None
    mutex: StorageMutex | None = None
    retry: Any = None  # re-queues the trial of a dead process, once (RetryHeartbeatStaleTrialCallback)
    tracker: Any = None
    evaluator: Any = None
    parent_run_id: str | None = None
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # a view of the storage (see sync)
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)
    pruned_by_key: dict[str, dict[str, Any]] = field(default_factory=dict)  # configurations stopped early
    started: float = field(default_factory=time.monotonic)  # this invocation's start (the time split)
    confirm_s: float = 0.0  # this invocation's confirmation round
    run_ids: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    new_trials: int = 0
    grid_done: bool = False
    mlflow_warned: bool = False
    meta_has_worker: bool = False
    sessions: list[dict[str, Any]] | None = None  # run_meta.json's history of invocations
    judge_impl: Any = None
    progress: Any = None
    comparison_route: str | None = None  # the MLflow UI's saved trial comparison
    fleet_report: Any = None

    # the names study.fleet reads
    @property
    def opts(self) -> Any:
        return self.plan.opts

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def out_dir(self) -> Any:
        return self.plan.out_dir

    @property
    def files(self) -> Any:
        return self.plan.files

    @property
    def tracking_uri(self) -> str:
        return self.plan.tracking_uri

    @property
    def experiment_name(self) -> str:
        return f"xlstm_tune/{self.plan.name}"

    @property
    def study_uid(self) -> str | None:
        return self.study.user_attrs.get(STUDY_UID_ATTR) if self.study is not None else None

    def sync(self) -> None:
        """Refresh the records and the measured configurations from the storage."""
        from xlstm_tune.study.views import measured_by_key, pruned_by_key, records_from_storage

        self.records = records_from_storage(self.plan, self.study)
        self.by_key = measured_by_key(self.records)
        self.pruned_by_key = pruned_by_key(self.records)

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

    def close(self) -> None:
        if self.mutex is not None:
            self.mutex.close()


def open_session(plan: StudyPlan, out: TextIO | None = None, err: TextIO | None = None) -> StudySession:
    """Open the storage, create or join the Optuna study, start (or join) the MLflow parent run."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    o = plan.opts
    policy = HeartbeatPolicy(o.heartbeat_interval, o.grace_period)
    s = StudySession(plan=plan, out=out or sys.stdout, err=err or sys.stderr, notes=list(plan.notes),
                     owner=this_owner(), policy=policy)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        s.retry = RetryHeartbeatStaleTrialCallback(max_retry=1)
    s.storage = open_storage(o.storage, plan.out_dir, heartbeat_interval=policy.interval_s,
                             grace_period=policy.grace_s, stale_trial_callback=s.retry)
    s.mutex = StorageMutex(o.storage, plan.out_dir, plan.name)
    try:
        with s.mutex:
            _open_study(s)
        _start_parent(s)
    except BaseException:
        s.close()
        raise
    return s


def _study_exists(storage: Any, name: str) -> bool:
    import optuna

    return name in optuna.get_all_study_names(storage)


def _check_recorded_storage(s: StudySession, exists: bool) -> None:
    """This output folder's run_meta.json names a study; the storage must hold that very study."""
    p = s.plan
    rec = (p.previous_meta or {}).get("storage_record")
    if not isinstance(rec, Mapping) or not rec.get("study_uid"):
        return
    was = f"run_meta.json records it in {rec.get('identity')} with {len(rec.get('trials') or {})} finished trial(s)"
    fix = "pass the --storage it was run with, or a new --study-name or --out-dir"
    if not exists:
        raise UserError(f"study {p.name!r} is not in the storage {p.storage_label} ({was}): {fix}")
    if s.study_uid != rec["study_uid"]:
        raise UserError(f"study {p.name!r} in {p.storage_label} is another study than this folder's ({was}): {fix}")
    trials = {t.number: t for t in s.study.get_trials(deepcopy=False)}
    for number, key in sorted((int(n), k) for n, k in (rec.get("trials") or {}).items()):
        t = trials.get(number)
        if t is None or not t.state.is_finished():
            raise UserError(f"study {p.name!r} in {p.storage_label} lacks trial {number} ({was}): {fix}")
        from xlstm_tune.study.views import record_of

        now = record_of(p, t)
        if now is not None and key and now.get("key") != key:
            raise UserError(f"study {p.name!r} in {p.storage_label}: trial {number} is another configuration "
                            f"than the one recorded ({was}): {fix}")


def _open_study(s: StudySession) -> None:
    """Create or load the study (under the storage mutex: processes starting together agree on one)."""
    import optuna

    from xlstm_tune.study.samplers import make_sampler

    p = s.plan
    sampler = make_sampler(p.sampler_name, seed=p.spec.study["seed"], n_objectives=len(p.objectives),
                           n_trials=p.n_trials, grid=p.space.grid() if p.sampler_name == "grid" else None,
                           options=p.spec.sampler)
    directions = ["maximize"] * len(p.objectives)
    try:
        exists = _study_exists(s.storage, p.name)
        if exists:
            s.study = optuna.load_study(study_name=p.name, storage=s.storage, sampler=sampler)
        _check_recorded_storage(s, exists)
        if exists:
            _check_joined(s, len(directions))
        else:
            s.study = optuna.create_study(storage=s.storage, study_name=p.name, directions=directions,
                                          sampler=sampler, load_if_exists=True)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot create or load study {p.name!r} in {p.storage_label}: {exc}") from None
    p.files.ensure_dirs()
    if s.study.user_attrs.get(STUDY_UID_ATTR) is None:
        s.study.set_user_attr(STUDY_UID_ATTR, uuid.uuid4().hex)
        s.study.set_user_attr(STUDY_IDENTITY_ATTR, join_identity(p))
    if s.study.metric_names != p.objectives:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            s.study.set_metric_names(list(p.objectives))  # the dashboard and plots name the axes


def join_identity(p: StudyPlan) -> dict[str, Any]:
    """What every process of one study must measure alike: the measurement identity, with the device
    reduced to its type (the workers of one study run on cuda:0, cuda:1, ... of many hosts)."""
    import copy

    ident = copy.deepcopy(p.identity)
    ident.pop("device", None)
    model = ident.get("spec", {}).get("model")
    if isinstance(model, dict):
        model.pop("device", None)
    ident["device_type"] = p.caps.get("device_type")
    return ident


def _check_joined(s: StudySession, n_objectives: int) -> None:
    """A process joining an existing study measures it the way it was started."""
    p = s.plan
    if len(s.study.directions) != n_objectives:
        raise UserError(f"study {p.name!r} in {p.storage_label} has {len(s.study.directions)} objective(s), "
                        f"this run has {n_objectives} ({p.objectives}): use a new --study-name")
    ident = s.study.user_attrs.get(STUDY_IDENTITY_ATTR)
    if ident is not None and ident != join_identity(p):
        diff = first_difference(ident, join_identity(p))
        raise UserError(f"study {p.name!r} in {p.storage_label} was run with different settings ({diff}): use the "
                        f"same settings to join it, or pass a new --study-name")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _start_parent(s: StudySession) -> None:
    from xlstm_tune.tracking.mlflow_log import StudyTracker, comparison_columns, default_artifact_root

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
        s.comparison_route = s.tracker.save_comparison_view(
            *comparison_columns(p.spec.context_lens, list(p.space.dims)))
    except UserError:
        raise
    except Exception as exc:
        if storage_fault(exc):
            raise  # a read-only or full disk: the CLI names it in one line
        raise UserError(f"cannot use the MLflow store {p.tracking_uri} ({type(exc).__name__}: "
                        f"{(str(exc).splitlines() or [''])[0][:200]}): check --tracking-uri") from None


def storage_record(s: StudySession) -> dict[str, Any]:
    """What run_meta.json keeps of the storage: its identity, the study's uid, its finished trials' keys."""
    p = s.plan
    return {"identity": storage_identity(p.opts.storage, p.out_dir), "study_uid": s.study_uid,
            "trials": {str(n): r.get("key") for n, r in sorted(s.records.items())}}
