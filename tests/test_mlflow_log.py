"""tracking.mlflow_log against a real sqlite MLflow store (one store shared by the module: creating it is slow)."""
from __future__ import annotations

from pathlib import Path

import pytest

from xlstm_tune.errors import UserError
from xlstm_tune.tracking.mlflow_log import (
    TAG_PARENT,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
    StudyTracker,
    default_artifact_root,
    default_tracking_uri,
    resolve_tracking_uri,
)

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("mlstore")
    uri = f"sqlite:///{root}/mlflow.db"
    art = root / "artifacts"
    # Creating the first client builds the schema (the slow part), once for the whole module.
    StudyTracker(uri, "warmup", art).get_or_create_experiment()
    return {"root": root, "uri": uri, "artifacts": art}


def _tracker(store: dict, experiment: str) -> StudyTracker:
    return StudyTracker(store["uri"], experiment, store["artifacts"])


# ---- URIs (no store needed) ----------------------------------------------------------------------
def test_tracking_uri_precedence(tmp_path: Path) -> None:
    default = default_tracking_uri(tmp_path / "out")
    assert default == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute path after the three slashes
    env = {"MLFLOW_TRACKING_URI": "sqlite:///env.db"}
    assert resolve_tracking_uri(None, tmp_path, environ={}) == default_tracking_uri(tmp_path)
    assert resolve_tracking_uri(None, tmp_path, environ=env) == "sqlite:///env.db"
    assert resolve_tracking_uri("sqlite:///cli.db", tmp_path, environ=env) == "sqlite:///cli.db"
    assert resolve_tracking_uri("http://localhost:5000", tmp_path, environ={}) == "http://localhost:5000"
    assert default_artifact_root(tmp_path) == (tmp_path / "artifacts").resolve()


@pytest.mark.parametrize("uri", ["./mlruns", "mlruns", "/abs/mlruns", "file:///tmp/mlruns"])
def test_file_store_rejected(tmp_path: Path, uri: str) -> None:
    with pytest.raises(UserError) as exc:
        resolve_tracking_uri(uri, tmp_path, environ={})
    msg = str(exc.value)
    assert "sqlite:///" in msg and "\n" not in msg
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, tmp_path, environ={"MLFLOW_TRACKING_URI": uri})
    # MLflow's own opt-out is respected.
    assert resolve_tracking_uri(uri, tmp_path, environ={"MLFLOW_ALLOW_FILE_STORE": "true"}) == uri


# ---- runs ----------------------------------------------------------------------------------------
def test_parent_and_children(store: dict, tmp_path: Path) -> None:
    tr = _tracker(store, "exp-children")
    exp_id = tr.get_or_create_experiment()
    exp = tr.client.get_experiment(exp_id)
    assert exp.artifact_location == store["artifacts"].resolve().as_uri()

    parent = tr.start_parent("study-a", params={"n_trials": 3, "sampler": "tpe"}, tags={"model": "tiny"})
    out = tmp_path / "trial-1.txt"
    out.write_text("continuation text")
    ids = {}
    for n in range(3):
        ids[n] = tr.log_trial(
            n,
            params={"backend": "queued", "chunk_size": 32 * (n + 1), "t_inner": 4},
            metrics={"prefill_tok_s": 100.0 + n, "decode_tok_s": None, "prefill_tok_s_cv": float("nan")},
            tags={"state": "COMPLETE"},
            artifacts=[out] if n == 1 else [],
        )
        tr.finish_trial(ids[n], "FINISHED")
    tr.log_parent_metrics({"best_prefill_tok_s": 102.0}, step=2)
    tr.end_parent("FINISHED")

    client = tr.client
    children = client.search_runs([exp_id], filter_string=f"tags.`{TAG_PARENT}` = '{parent}'")
    assert len(children) == 3
    by_trial = {int(r.data.tags[TAG_TRIAL]): r for r in children}
    assert set(by_trial) == {0, 1, 2}
    r1 = by_trial[1]
    assert r1.info.run_id == ids[1]
    assert r1.info.run_name == "trial-1"
    assert r1.info.status == "FINISHED" and r1.info.end_time is not None
    assert r1.data.params == {"backend": "queued", "chunk_size": "64", "t_inner": "4"}
    assert r1.data.metrics == {"prefill_tok_s": 101.0}  # None and NaN were skipped
    assert r1.data.tags["state"] == "COMPLETE"
    assert r1.data.tags[TAG_STUDY] == "study-a" and r1.data.tags[TAG_ROLE] == "trial"

    p = client.get_run(parent)
    assert p.info.run_name == "study-a" and p.info.status == "FINISHED"
    assert p.data.tags[TAG_ROLE] == "parent" and p.data.tags["model"] == "tiny"
    assert p.data.params == {"n_trials": "3", "sampler": "tpe"}
    assert p.data.metrics == {"best_prefill_tok_s": 102.0}

    # The artifact is a real file under the artifact root.
    art_dir = Path(r1.info.artifact_uri.removeprefix("file://"))
    assert art_dir.is_relative_to(store["artifacts"].resolve())
    assert (art_dir / "trial-1.txt").read_text() == "continuation text"
    assert set(tr.find_trial_runs()) == {0, 1, 2}


def test_log_trial_idempotent(store: dict) -> None:
    tr = _tracker(store, "exp-idem")
    tr.start_parent("study-b", {}, {})
    first = tr.log_trial(0, {"chunk_size": 32}, {"prefill_tok_s": 5.0}, {}, [], status="FINISHED")
    again = tr.log_trial(0, {"chunk_size": 32}, {"prefill_tok_s": 5.0}, {}, [])
    assert again == first
    runs = tr.find_trial_runs()
    assert list(runs) == [0] and runs[0].info.run_id == first
    children = tr.client.search_runs([tr.experiment_id], filter_string=f"tags.`{TAG_TRIAL}` = '0'")
    assert len(children) == 1
    # A resumed process (new tracker) also sees it as logged.
    tr2 = _tracker(store, "exp-idem")
    tr2.start_parent("study-b", {}, {})
    assert tr2.log_trial(0, {"chunk_size": 32}, {}, {}, []) == first


def test_running_orphan_is_marked_and_replaced(store: dict) -> None:
    killed = _tracker(store, "exp-orphan")
    killed.start_parent("study-c", {}, {})
    orphan = killed.log_trial(4, {"chunk_size": 16}, {"prefill_tok_s": 1.0}, {}, [])  # never finished
    # Within the same tracker, an open child is the same record, not an orphan.
    assert killed.log_trial(4, {"chunk_size": 16}, {}, {}, []) == orphan

    resumed = _tracker(store, "exp-orphan")
    resumed.start_parent("study-c", {}, {})
    fresh = resumed.log_trial(4, {"chunk_size": 16}, {"prefill_tok_s": 2.0}, {}, [], status="FINISHED")
    assert fresh != orphan
    old = resumed.client.get_run(orphan)
    assert old.info.status == "KILLED" and old.info.end_time is not None
    runs = resumed.find_trial_runs()
    assert runs[4].info.run_id == fresh and runs[4].data.metrics["prefill_tok_s"] == 2.0


def test_parent_reused_on_resume(store: dict) -> None:
    first = _tracker(store, "exp-resume")
    pid = first.start_parent("study-d", {"n_trials": 5}, {})
    first.end_parent("FAILED")

    second = _tracker(store, "exp-resume")
    pid2 = second.start_parent("study-d", {"n_trials": 10, "seed": 1}, {"resumed": "yes"})
    assert pid2 == pid
    run = second.client.get_run(pid)
    assert run.info.status == "RUNNING"
    assert run.data.params == {"n_trials": "5", "seed": "1"}  # params are immutable: first value kept
    assert run.data.tags["xlstm_tune.param_changed.n_trials"] == "10"
    assert run.data.tags["resumed"] == "yes"
    second.end_parent()
    assert second.client.get_run(pid).info.status == "FINISHED"

    other = _tracker(store, "exp-resume").start_parent("study-e")
    assert other != pid  # a different study gets its own parent


def test_parent_required_and_status_checked(store: dict) -> None:
    tr = _tracker(store, "exp-misc")
    with pytest.raises(RuntimeError):
        tr.log_trial(0)
    tr.start_parent("study-f")
    with pytest.raises(ValueError):
        tr.end_parent("DONE")


# ---- the MLflow UI: experiment kind, comparison view, real trial times --------------------------
def test_experiment_opens_on_the_runs_table(store: dict) -> None:
    from xlstm_tune.tracking.mlflow_log import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND

    tr = _tracker(store, "exp-kind")
    exp_id = tr.get_or_create_experiment()
    assert tr.client.get_experiment(exp_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND == "custom_model_development"
    # An experiment made before the tag existed gets it when a study opens it again.
    old_id = tr.client.create_experiment("exp-kind-old", artifact_location=store["artifacts"].as_uri())
    assert TAG_EXPERIMENT_KIND not in tr.client.get_experiment(old_id).tags
    assert _tracker(store, "exp-kind-old").get_or_create_experiment() == old_id
    assert tr.client.get_experiment(old_id).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND


def test_comparison_view_is_a_shared_view_state(store: dict) -> None:
    import json

    from xlstm_tune.tracking.mlflow_log import (
        COMPARISON_VIEW_KEY,
        TAG_SHARED_VIEW,
        comparison_columns,
    )

    tr = _tracker(store, "exp-view")
    parent = tr.start_parent("study-view")
    metrics, params = comparison_columns([128, 512], ["backend", "chunk_size"])
    route = tr.save_comparison_view(metrics, params)
    assert route == f"#/experiments/{tr.experiment_id}?viewStateShareKey={COMPARISON_VIEW_KEY}"
    state = json.loads(tr.client.get_experiment(tr.experiment_id).tags[TAG_SHARED_VIEW + COMPARISON_VIEW_KEY])
    assert state["selectedColumns"][:4] == ["metrics.`prefill_tok_s`", "metrics.`decode_tok_s`",
                                            "metrics.`speedup_prefill_ctx128`", "metrics.`speedup_prefill_ctx512`"]
    assert "metrics.`fidelity_rel_err`" in state["selectedColumns"]
    assert state["selectedColumns"][-2:] == ["params.`backend`", "params.`chunk_size`"]
    assert state["orderByKey"] == "metrics.`prefill_tok_s`" and state["orderByAsc"] is False
    assert state["runsExpanded"] == {parent: True}  # the trials show under their study


def test_child_runs_carry_the_trials_own_times(store: dict) -> None:
    tr = _tracker(store, "exp-times")
    tr.start_parent("study-times")
    started, finished = "2026-03-01T10:00:00+00:00", "2026-03-01T10:00:42.500000+00:00"
    run_id = tr.log_trial(0, {"chunk_size": 32}, {"prefill_tok_s": 7.0}, {}, [], status="FINISHED",
                          started_at=started, finished_at=finished)
    info = tr.client.get_run(run_id).info
    t0 = 1772359200000  # 2026-03-01T10:00:00Z in epoch ms
    assert (info.start_time, info.end_time) == (t0, t0 + 42500)
    # Metrics are stamped with the trial's end, so the UI's time axis matches the run.
    (hist,) = tr.client.get_metric_history(run_id, "prefill_tok_s")
    assert hist.timestamp == t0 + 42500
    # An open child finished later keeps the trial's end time too.
    open_id = tr.log_trial(1, {"chunk_size": 64}, {}, {}, [], started_at=1772359300.0, finished_at=1772359360.25)
    tr.finish_trial(open_id, "FAILED")
    info = tr.client.get_run(open_id).info
    assert (info.start_time, info.end_time, info.status) == (1772359300000, 1772359360250, "FAILED")


# ---- artifacts follow the store -----------------------------------------------------------------
def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_artifacts_follow_a_copied_study_folder(tmp_path: Path) -> None:
    import shutil

    original = tmp_path / "original"
    tr = StudyTracker(default_tracking_uri(original), "exp-copy", default_artifact_root(original))
    tr.start_parent("study-copy")
    out = tmp_path / "trial-0.txt"
    out.write_text("first")
    first = tr.log_trial(0, {"chunk_size": 32}, {"prefill_tok_s": 1.0}, {}, [out], status="FINISHED")
    tr.end_parent()
    before = _files(original / "artifacts")
    assert len(before) == 1

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    resumed = StudyTracker(default_tracking_uri(copy), "exp-copy", default_artifact_root(copy))
    resumed.start_parent("study-copy")
    out.write_text("second")
    second = resumed.log_trial(1, {"chunk_size": 64}, {"prefill_tok_s": 2.0}, {}, [out], status="FINISHED")
    resumed.log_parent_artifacts([out])

    assert _files(original / "artifacts") == before  # nothing new in the original folder
    exp = resumed.client.get_experiment(resumed.experiment_id)
    assert exp.artifact_location == default_artifact_root(copy).as_uri()
    for run_id in (first, second, resumed.parent_run_id):
        uri = resumed.client.get_run(run_id).info.artifact_uri
        assert Path(uri.removeprefix("file://")).is_relative_to(default_artifact_root(copy)), uri
    new_dir = Path(resumed.client.get_run(second).info.artifact_uri.removeprefix("file://"))
    assert (new_dir / "trial-0.txt").read_text() == "second"
    # The copied trial's artifact is readable through its (rewritten) run in the copy.
    old_dir = Path(resumed.client.get_run(first).info.artifact_uri.removeprefix("file://"))
    assert (old_dir / "trial-0.txt").read_text() == "first"


def test_a_shared_store_keeps_its_artifact_location(tmp_path: Path) -> None:
    """A store that is not the study folder's own (here a sqlite file elsewhere) is not rewritten."""
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    first = StudyTracker(uri, "exp-shared", tmp_path / "a" / "artifacts")
    exp_id = first.get_or_create_experiment()
    second = StudyTracker(uri, "exp-shared", tmp_path / "b" / "artifacts")
    assert second.get_or_create_experiment() == exp_id
    assert second.client.get_experiment(exp_id).artifact_location == (tmp_path / "a" / "artifacts").resolve().as_uri()
