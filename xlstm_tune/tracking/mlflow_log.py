"""MLflow logging: one parent run per study, one child run per trial (docs/DESIGN.md §1, §4).

Plain `mlflow.MlflowClient` calls with explicit run ids, not the fluent API (global "active run" state)
and not Optuna's deprecated `MLflowCallback`: trials run in worker processes, studies resume after a
kill, and both need runs addressed by id and found again by tag:

    parent: tags xlstm_tune.study=<study>, xlstm_tune.role=parent; run name <study>
    child:  tags mlflow.parentRunId=<parent id>, xlstm_tune.trial=<n>, xlstm_tune.study, xlstm_tune.role=trial;
            run name trial-<n>

Re-running `log_trial` for a trial already on record (resume) logs nothing twice, and a child left
RUNNING by a killed process is marked KILLED and replaced.

Several processes may open one fresh store at once (`study --devices`, a Ray cluster): `prepare_store`
creates MLflow's schema under an exclusive lock (a file lock next to a sqlite file, an advisory lock on
PostgreSQL), because MLflow's own store constructor races on `CREATE TABLE`. The experiment opens on
the runs table (`mlflow.experimentKind`), carries a saved comparison view of the trials
(`comparison_route`), and keeps its artifacts in the store it belongs to (`_follow_store`).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from xlstm_tune.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

TAG_STUDY = "xlstm_tune.study"
TAG_ROLE = "xlstm_tune.role"
TAG_TRIAL = "xlstm_tune.trial"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_SUPERSEDED = "xlstm_tune.superseded_by_retry"
TAG_PARAM_CHANGED = "xlstm_tune.param_changed."
# The MLflow UI opens an experiment of this kind on its runs table, not on the GenAI overview.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# A view of the runs table saved as an experiment tag: `#/experiments/<id>?viewStateShareKey=<key>`
# opens it (the UI's "share view" mechanism, mlflow.sharedViewState.<key>, read as plain JSON).
TAG_SHARED_VIEW = "mlflow.sharedViewState."
COMPARISON_VIEW_KEY = "xlstm-tune-trials"

STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
# A child in one of these states is the trial's record: logging the trial again returns it.
_DONE = ("FINISHED", "FAILED")

# MLflow's limits (mlflow.utils.validation), copied so importing this module stays cheap.
_MAX_PARAM_VAL = 6000
_MAX_TAG_VAL = 8000
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


# ---- where the store is --------------------------------------------------------------------------
def default_tracking_uri(out_dir: str | Path) -> str:
    """`sqlite:///<absolute out_dir>/mlflow.db`: the embedded default store (docs/DESIGN.md §4)."""
    return f"sqlite:///{(Path(out_dir).resolve() / 'mlflow.db').as_posix()}"


def default_artifact_root(out_dir: str | Path) -> Path:
    """`<out_dir>/artifacts`, absolute."""
    return (Path(out_dir) / "artifacts").resolve()


def _file_store_allowed(environ: Mapping[str, str]) -> bool:
    # MLflow's own opt-out for its deprecated file store; a user who set it knows what they asked for.
    return environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes")


def check_tracking_uri(uri: str, source: str = "--tracking-uri", environ: Mapping[str, str] | None = None) -> str:
    """Reject a file-store path (`./mlruns`, `file:///...`): MLflow 3.17 refuses them at first use.

    Checking here turns MLflow's deep traceback into a one-line error before any work is done.
    """
    environ = os.environ if environ is None else environ
    uri = uri.strip()
    if not uri:
        raise UserError(f"{source} is empty: pass a store URI such as sqlite:///ABS/PATH/mlflow.db")
    scheme = urlparse(uri).scheme.lower()
    is_path = scheme == "" or scheme == "file" or len(scheme) == 1  # len 1: a Windows drive letter
    if is_path and uri != "databricks" and not _file_store_allowed(environ):
        raise UserError(
            f"{source}={uri!r} is a file-store path, which MLflow 3.17 refuses: "
            f"use a database store such as sqlite:///{Path(uri.removeprefix('file://')).resolve().as_posix()}/mlflow.db"
        )
    return uri


def resolve_tracking_uri(cli_uri: str | None, out_dir: str | Path, environ: Mapping[str, str] | None = None) -> str:
    """The tracking URI to use: --tracking-uri flag > MLFLOW_TRACKING_URI > sqlite store in out_dir."""
    environ = os.environ if environ is None else environ
    if cli_uri:
        return check_tracking_uri(cli_uri, "--tracking-uri", environ)
    env_uri = environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return check_tracking_uri(env_uri, "MLFLOW_TRACKING_URI", environ)
    return default_tracking_uri(out_dir)


def _ensure_sqlite_dir(uri: str) -> None:
    # sqlite creates the db file but not its directory; MLflow then fails with an opaque OperationalError.
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if not db or db == ":memory:" else Path(db)


def with_installed_driver(uri: str) -> str:
    """`postgresql://...` with the PostgreSQL driver that is installed (psycopg 3 if psycopg2 is absent).

    SQLAlchemy reads a bare `postgresql://` as psycopg2; the project depends on psycopg (3).
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres"):
        return uri
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        return f"postgresql+psycopg://{rest}"
    return uri


_PREPARED: set[str] = set()
# Any fixed 64-bit number: the advisory lock that serialises MLflow schema creation on PostgreSQL.
_PG_SCHEMA_LOCK = 0x786C73746D5F6D6C  # "xlstm_ml"


def prepare_store(uri: str) -> None:
    """Make sure the store's schema exists, creating it under an exclusive lock; once per process.

    MLflow's SqlAlchemyStore checks for its tables and creates them without a lock, so processes that
    open a fresh store together fail with `table ... already exists`. Here the first process creates
    the schema while the others wait on the lock and then find it complete. A server (http) store
    creates its own schema. The known race is retried once in case another program (not holding our
    lock) created the tables at the same moment.
    """
    if uri in _PREPARED or urlparse(uri).scheme.lower() in ("http", "https", "databricks"):
        return
    _ensure_sqlite_dir(uri)
    for attempt in (1, 2):
        try:
            with _schema_lock(uri):
                _open_store(uri)
            break
        except Exception as exc:  # noqa: BLE001 - sqlalchemy's OperationalError/ProgrammingError
            if attempt == 2 or "already exists" not in str(exc):
                raise
            log.info("MLflow schema of %s was being created by another process; retrying once", uri)
    _PREPARED.add(uri)


def _open_store(uri: str) -> None:
    # The store object is what creates the tables; MLflow caches it per URI, so later clients reuse it.
    from mlflow.tracking._tracking_service.utils import _get_store

    _get_store(uri)


class _schema_lock:
    """An exclusive lock for creating the schema: flock on `<db>.schema.lock`, or pg_advisory_lock."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._fd: int | None = None
        self._conn: Any = None
        self._engine: Any = None

    def __enter__(self) -> "_schema_lock":
        db = _sqlite_path(self.uri)
        scheme = urlparse(self.uri).scheme.lower().split("+", 1)[0]
        if db is not None:
            import fcntl

            self._fd = os.open(f"{db}.schema.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif scheme in ("postgresql", "postgres"):
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(self.uri, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        if self._conn is not None:
            import sqlalchemy

            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_SCHEMA_LOCK})
            finally:
                self._conn.close()
                self._engine.dispose()
                self._conn = None


# ---- value conversion ----------------------------------------------------------------------------
def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _param_value(value: Any) -> str:
    return _clip(str(value), _MAX_PARAM_VAL)


def _tag_value(value: Any) -> str:
    return _clip(str(value), _MAX_TAG_VAL)


def _metric_value(key: str, value: Any) -> float | None:
    """A loggable float, or None to skip: None/NaN/inf are not logged (an absent metric is not 0 or NaN)."""
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        log.warning("metric %r has non-numeric value %r: not logged", key, value)
        return None
    return f if math.isfinite(f) else None


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _quote(value: str) -> str:
    # MLflow filter strings have no escape for quotes; study names are checked not to contain them.
    if "'" in value:
        raise UserError(f"name {value!r} contains a quote: use letters, digits, '-', '_' or '.'")
    return f"'{value}'"


class StudyTracker:
    """Logs one study into one MLflow experiment: a parent run and a child run per trial.

    Safe to re-create in a resumed process: `start_parent` finds the study's existing parent, and
    `log_trial` finds trials already on record.
    """

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_root: str | Path | None = None) -> None:
        from mlflow import MlflowClient  # slow import (~1 s): only when tracking is really used

        tracking_uri = with_installed_driver(tracking_uri)
        prepare_store(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_root = Path(artifact_root).resolve() if artifact_root is not None else None
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.study_name: str | None = None
        self._open_children: dict[int, str] = {}  # trial -> RUNNING child created by this tracker
        self._end_ms: dict[str, int | None] = {}  # child run -> the trial's own end time

    # ---- experiment ----------------------------------------------------------------------------
    def get_or_create_experiment(self) -> str:
        """The experiment's id, creating it (artifacts under `artifact_root`) or restoring it if deleted."""
        from mlflow.exceptions import MlflowException

        if self.experiment_id is not None:
            return self.experiment_id
        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            location = self.artifact_root.as_uri() if self.artifact_root is not None else None
            if self.artifact_root is not None:
                self.artifact_root.mkdir(parents=True, exist_ok=True)
            try:
                self.experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
                return self.experiment_id
            except MlflowException:
                # Another process created it between our lookup and create: use theirs.
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        self.experiment_id = exp.experiment_id
        if exp.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:
            self.client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        self._follow_store(exp.experiment_id, exp.artifact_location)
        return self.experiment_id

    def _follow_store(self, experiment_id: str, location: str) -> None:
        """Point an experiment of a copied or moved study folder at the artifacts next to its store.

        MLflow records an absolute artifact location per experiment (and per run). A sqlite store that
        sits next to `artifact_root` (the default layout, `<out-dir>/mlflow.db` + `<out-dir>/artifacts`)
        travels with that folder: when its experiment still names another folder's artifacts, new
        artifacts would land in the original study. The locations are rewritten to this folder, and
        the change is logged. Shared stores (a server, PostgreSQL, a sqlite file elsewhere) keep the
        location they were created with: it is the one every process writing to them uses.
        """
        db = _sqlite_path(self.tracking_uri)
        if self.artifact_root is None or db is None or db.resolve().parent != self.artifact_root.parent:
            return
        here = self.artifact_root.as_uri()
        if location == here or urlparse(location).scheme not in ("file", ""):
            return
        old = location if urlparse(location).scheme == "file" else Path(location).resolve().as_uri()
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"sqlite:///{db}", poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("UPDATE experiments SET artifact_location = :new WHERE experiment_id = :id"),
                             {"new": here, "id": int(experiment_id)})
                conn.execute(sqlalchemy.text(
                    "UPDATE runs SET artifact_uri = :new || substr(artifact_uri, :n) "
                    "WHERE experiment_id = :id AND substr(artifact_uri, 1, :m) = :old"),
                    {"new": here, "n": len(old) + 1, "m": len(old), "old": old, "id": int(experiment_id)})
        finally:
            engine.dispose()
        self.artifact_root.mkdir(parents=True, exist_ok=True)
        log.warning("MLflow experiment %s kept its artifacts in %s; this store is in %s, so its artifacts now go "
                    "to %s", self.experiment_name, old, db.parent, here)

    # ---- the runs table --------------------------------------------------------------------------
    def save_comparison_view(self, metrics: Iterable[str], params: Iterable[str]) -> str:
        """Save the trials' comparison (key metrics and knobs as columns, fastest first) in the experiment.

        Returns the UI route that opens it, e.g. `#/experiments/1?viewStateShareKey=xlstm-tune-trials`
        (append to the server's address). The view is the MLflow UI's shared view state, stored as the
        experiment tag `mlflow.sharedViewState.<key>`; re-saving it replaces it.
        """
        import json

        exp_id = self.get_or_create_experiment()
        metric_cols = [f"metrics.`{m}`" for m in metrics]
        columns = [*metric_cols, *(f"params.`{p}`" for p in params)]
        state: dict[str, Any] = {
            "selectedColumns": columns,
            "orderByKey": metric_cols[0] if metric_cols else "attributes.start_time",
            "orderByAsc": False,
            "runsExpanded": {self.parent_run_id: True} if self.parent_run_id else {},
            "runsHiddenMode": "SHOW_ALL",
        }
        self.client.set_experiment_tag(exp_id, TAG_SHARED_VIEW + COMPARISON_VIEW_KEY, json.dumps(state))
        return comparison_route(exp_id)

    def _search(self, filter_string: str, order_by: list[str] | None = None) -> list["Run"]:
        """All matching runs of the experiment (follows page tokens: studies can exceed one page)."""
        exp_id = self.get_or_create_experiment()
        runs: list[Run] = []
        token: str | None = None
        while True:
            page = self.client.search_runs(
                [exp_id], filter_string=filter_string, max_results=1000, order_by=order_by, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    # ---- parent run ----------------------------------------------------------------------------
    def start_parent(self, study_name: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> str:
        """Start (or, on resume, reopen) the study's parent run; returns its id.

        Params already on a reused parent keep their first value (MLflow params are immutable); a
        changed value (e.g. a larger n_trials on resume) is recorded as tag `xlstm_tune.param_changed.<k>`.
        """
        exp_id = self.get_or_create_experiment()
        self.study_name = study_name
        existing = self._search(
            f"tags.`{TAG_STUDY}` = {_quote(study_name)} and tags.`{TAG_ROLE}` = 'parent'",
            order_by=["attributes.start_time ASC"],
        )
        all_tags = {TAG_STUDY: study_name, TAG_ROLE: "parent", **{k: v for k, v in (tags or {}).items()}}
        if existing:
            run = existing[0]  # the oldest: concurrent starters converge on the same parent
            run_id = run.info.run_id
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self.parent_run_id = run_id
            self._log(run_id, params=params or {}, tags={k: v for k, v in all_tags.items() if k not in (TAG_STUDY, TAG_ROLE)},
                      existing_params=run.data.params)
        else:
            run = self.client.create_run(
                exp_id, tags={k: _tag_value(v) for k, v in all_tags.items()}, run_name=study_name
            )
            run_id = self._one_parent(study_name, run.info.run_id)
            self.parent_run_id = run_id
            self._log(run_id, params=params or {}, existing_params=self.client.get_run(run_id).data.params)
        return run_id

    def _one_parent(self, study_name: str, mine: str) -> str:
        """Processes that started the study together each created a parent: all keep the oldest."""
        parents = self._search(f"tags.`{TAG_STUDY}` = {_quote(study_name)} and tags.`{TAG_ROLE}` = 'parent'")
        oldest = min(parents, key=lambda r: (int(r.info.start_time or 0), r.info.run_id), default=None)
        if oldest is None or oldest.info.run_id == mine:
            return mine
        self.client.delete_run(mine)
        return oldest.info.run_id

    def _require_parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("StudyTracker.start_parent() must be called first")
        return self.parent_run_id

    def log_parent_params(self, params: Mapping[str, Any]) -> None:
        run_id = self._require_parent()
        self._log(run_id, params=params, existing_params=self.client.get_run(run_id).data.params)

    def log_parent_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Study-level metrics, e.g. best-so-far per completed trial (step = trial number)."""
        self._log(self._require_parent(), metrics=metrics, step=step)

    def log_parent_tags(self, tags: Mapping[str, Any]) -> None:
        self._log(self._require_parent(), tags=tags)

    def log_parent_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        self._log_artifacts(self._require_parent(), paths, artifact_path)

    def end_parent(self, status: str = "FINISHED") -> None:
        """Terminate the parent run (FINISHED, FAILED or KILLED), setting its end time."""
        self.client.set_terminated(self._require_parent(), _check_status(status, terminal=True))

    # ---- child runs ----------------------------------------------------------------------------
    def find_trial_runs(self) -> dict[int, "Run"]:
        """Trial number -> its child run; where several exist, the FINISHED/FAILED one, then the newest."""
        parent = self._require_parent()
        runs = self._search(f"tags.`{TAG_PARENT}` = {_quote(parent)}", order_by=["attributes.start_time ASC"])
        best: dict[int, Run] = {}
        for run in runs:
            try:
                n = int(run.data.tags.get(TAG_TRIAL, ""))
            except ValueError:
                continue
            prev = best.get(n)
            if prev is None or _rank(run) >= _rank(prev):
                best[n] = run
        return best

    def _trial_runs(self, trial_number: int) -> list["Run"]:
        parent = self._require_parent()
        return self._search(
            f"tags.`{TAG_PARENT}` = {_quote(parent)} and tags.`{TAG_TRIAL}` = '{int(trial_number)}'",
            order_by=["attributes.start_time ASC"],
        )

    def log_trial(
        self,
        trial_number: int,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        artifacts: Iterable[str | Path] = (),
        *,
        status: str | None = None,
        started_at: str | float | None = None,
        finished_at: str | float | None = None,
    ) -> str:
        """Log one trial as a child run of the parent; returns the child's run id.

        `started_at`/`finished_at` (ISO-8601 text or epoch seconds) are the trial's own times: the run
        shows them as its start and end, not the moment it was logged.

        Idempotent: if the trial already has a FINISHED (or FAILED) child, nothing is logged and that id
        is returned. A RUNNING child not opened by this tracker was left by a killed process: it is
        marked KILLED (tag `xlstm_tune.superseded_by_retry`) and a fresh child is created. The new child
        stays RUNNING until `finish_trial`, unless `status` is given, which terminates it here.
        """
        parent = self._require_parent()
        exp_id = self.get_or_create_experiment()
        n = int(trial_number)
        for run in reversed(self._trial_runs(n)):
            st = run.info.status
            if st in _DONE:
                return run.info.run_id
            if st == "RUNNING" and self._open_children.get(n) == run.info.run_id:
                return run.info.run_id  # opened by us and not finished yet: the same record
        for run in self._trial_runs(n):
            if run.info.status in ("RUNNING", "SCHEDULED"):
                log.warning("trial %d: child run %s was left %s by a killed process; marking it KILLED",
                            n, run.info.run_id, run.info.status)
                self.client.set_tag(run.info.run_id, TAG_SUPERSEDED, "true")
                self.client.set_terminated(run.info.run_id, "KILLED")
        child_tags = {
            **{k: v for k, v in (tags or {}).items()},
            TAG_PARENT: parent,
            TAG_TRIAL: str(n),
            TAG_ROLE: "trial",
        }
        if self.study_name is not None:
            child_tags[TAG_STUDY] = self.study_name
        start_ms, end_ms = _epoch_ms(started_at), _epoch_ms(finished_at)
        if start_ms is not None and end_ms is not None and end_ms < start_ms:
            end_ms = start_ms
        run = self.client.create_run(
            exp_id, tags={k: _tag_value(v) for k, v in child_tags.items()}, run_name=f"trial-{n}", start_time=start_ms
        )
        run_id = run.info.run_id
        self._open_children[n] = run_id
        self._end_ms[run_id] = end_ms
        try:
            self._log(run_id, params=params or {}, metrics=metrics or {}, timestamp_ms=end_ms)
            self._log_artifacts(run_id, artifacts)
        except BaseException:
            # A half-logged child is not a record: mark it so a retry replaces it.
            try:
                self.client.set_tag(run_id, TAG_SUPERSEDED, "true")
                self.client.set_terminated(run_id, "KILLED")
            finally:
                self._open_children.pop(n, None)
            raise
        if status is not None:
            self.finish_trial(run_id, status)
        return run_id

    def finish_trial(self, run_id: str, status: str = "FINISHED") -> None:
        """Terminate a child run: FINISHED for a completed trial, FAILED for a failed or pruned one."""
        self.client.set_terminated(run_id, _check_status(status, terminal=True), end_time=self._end_ms.pop(run_id, None))
        for n, rid in list(self._open_children.items()):
            if rid == run_id:
                del self._open_children[n]

    def log_trial_artifacts(self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        """More artifacts for an open child (e.g. outputs written after the metrics)."""
        self._log_artifacts(run_id, paths, artifact_path)

    def artifact_uri(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.artifact_uri

    # ---- low level -----------------------------------------------------------------------------
    def _log(
        self,
        run_id: str,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        step: int = 0,
        existing_params: Mapping[str, str] | None = None,
        timestamp_ms: int | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        existing_params = existing_params or {}
        param_list: list[Param] = []
        tag_list = [RunTag(str(k), _tag_value(v)) for k, v in (tags or {}).items()]
        for k, v in (params or {}).items():
            key, value = str(k), _param_value(v)
            if key in existing_params:
                if existing_params[key] != value:
                    log.warning("param %r was %r in this run and is now %r: kept the first, tagged the change",
                                key, existing_params[key], value)
                    tag_list.append(RunTag(TAG_PARAM_CHANGED + key, _tag_value(value)))
                continue
            param_list.append(Param(key, value))
        now_ms = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        metric_list = []
        for k, v in (metrics or {}).items():
            f = _metric_value(str(k), v)
            if f is not None:
                metric_list.append(Metric(str(k), f, now_ms, int(step)))
        for chunk in _chunks(param_list, _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=chunk)
        for chunk in _chunks(tag_list, _MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)
        for chunk in _chunks(metric_list, _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def _log_artifacts(self, run_id: str, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            path = Path(p)
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path=_join(artifact_path, path.name))
            elif path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)
            else:
                # A missing output must not lose the trial's record; say so and go on.
                log.warning("artifact %s does not exist: not logged to run %s", path, run_id)


def comparison_route(experiment_id: str) -> str:
    """The MLflow UI route of an experiment's saved trial comparison (see `save_comparison_view`)."""
    return f"#/experiments/{experiment_id}?viewStateShareKey={COMPARISON_VIEW_KEY}"


def comparison_columns(context_lens: Iterable[int], knobs: Iterable[str]) -> tuple[list[str], list[str]]:
    """The metrics and params of the trial comparison: throughput, speed-ups, fidelity, then the knobs."""
    lens = list(context_lens)
    metrics = ["prefill_tok_s", "decode_tok_s", *(f"speedup_prefill_ctx{n}" for n in lens), "speedup_decode",
               "fidelity_rel_err", "compile_s", "duration_s"]
    return metrics, list(knobs)


def _epoch_ms(value: str | float | None) -> int | None:
    """Epoch milliseconds from ISO-8601 text (a trial record's times) or epoch seconds; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return int(float(value) * 1000)
    from datetime import datetime, timezone

    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        log.warning("time %r is not ISO-8601: the run keeps its logging time", value)
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _join(prefix: str | None, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _rank(run: "Run") -> tuple[int, int]:
    done = 1 if run.info.status in _DONE else 0
    return (done, int(run.info.start_time or 0))


def _check_status(status: str, *, terminal: bool) -> str:
    s = str(status).strip().upper()
    allowed = ("FINISHED", "FAILED", "KILLED") if terminal else STATUSES
    if s not in allowed:
        raise ValueError(f"run status must be one of {allowed}, got {status!r}")
    return s
