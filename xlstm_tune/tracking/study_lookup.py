"""Finding an existing study's files and MLflow runs without creating anything (judge, plot, report)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlstm_tune.errors import UserError
from xlstm_tune.tracking.mlflow_log import TAG_ROLE, TAG_STUDY, StudyTracker
from xlstm_tune.tracking.study_files import StudyFiles

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient


def existing_study(out_dir: str | Path, name: str) -> StudyFiles:
    """The study's files, or a one-line UserError naming the studies that do exist under out_dir."""
    sf = StudyFiles.for_study(out_dir, name)  # rejects names that cannot be directory names
    if sf.root.is_dir():
        return sf
    studies_dir = Path(out_dir) / "studies"
    known = sorted(p.name for p in studies_dir.iterdir() if p.is_dir()) if studies_dir.is_dir() else []
    if known:
        shown = ", ".join(known[:10]) + (f" (+{len(known) - 10} more)" if len(known) > 10 else "")
        hint = f"studies there: {shown}"
    else:
        hint = "no studies there; pass --out-dir DIR where the study was run"
    raise UserError(f"no study {name!r} in {studies_dir} ({hint})")


@dataclass
class StudyRuns:
    """Read-only handle on a study's MLflow runs; `note` says why something is unavailable."""

    client: "MlflowClient | None" = None
    tracker: StudyTracker | None = None  # parent found: find_trial_runs / log_parent_artifacts work
    note: str | None = None
    _children: dict[int, str] | None = field(default=None, repr=False)

    def child_run_id(self, record: dict[str, Any]) -> str | None:
        """The trial's child run: its `mlflow_run_id` when that run exists, else found by tag."""
        if self.client is None:
            return None
        run_id = record.get("mlflow_run_id")
        if isinstance(run_id, str) and run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    return run_id
            except Exception:  # noqa: BLE001 - a stale id falls back to the tag lookup
                pass
        if self.tracker is None:
            return None
        if self._children is None:
            self._children = {n: r.info.run_id for n, r in self.tracker.find_trial_runs().items()}
        number = record.get("number")
        return self._children.get(number) if isinstance(number, int) else None


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:":
            return Path(db)
    return None


def open_study_runs(tracking_uri: str, study_name: str) -> StudyRuns:
    """Find the study's parent run (tags `xlstm_tune.study`, role parent) in any experiment.

    Never creates anything: a sqlite store file that does not exist is reported, not created, and
    the parent run is attached as it is (its status is left alone).
    """
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return StudyRuns(note=f"no MLflow store at {db}")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        parents = client.search_runs(
            exp_ids,
            filter_string=f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`{TAG_ROLE}` = 'parent'",
            order_by=["attributes.start_time ASC"],
            max_results=10,
        ) if exp_ids else []
    except Exception as exc:  # noqa: BLE001 - an unreadable store must not cost the written files
        return StudyRuns(note=f"cannot read the MLflow store {tracking_uri}: {' '.join(str(exc).split())[:200]}")
    if not parents:
        return StudyRuns(client=client, note=f"no MLflow parent run for study {study_name!r} in {tracking_uri}")
    parent = parents[0]  # the oldest, as StudyTracker.start_parent picks it
    exp = client.get_experiment(parent.info.experiment_id)
    tracker = StudyTracker(tracking_uri, exp.name)
    tracker.experiment_id = exp.experiment_id
    tracker.parent_run_id = parent.info.run_id
    tracker.study_name = study_name
    return StudyRuns(client=client, tracker=tracker)
