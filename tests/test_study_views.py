"""The Optuna storage is the study's one source of truth: trials.jsonl, summary.csv and the MLflow child
runs are views rebuilt from it, the knob values agree everywhere, and a storage that does not hold the
study an output folder recorded is refused in one line.

Replay studies (no model runs) keep each study to a second.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from test_study_replay import make_source  # noqa: E402

from xlstm_tune.cli.main import main  # noqa: E402
from xlstm_tune.runtime.options import KNOBS  # noqa: E402
from xlstm_tune.tracking.study_files import StudyFiles  # noqa: E402


def _journal(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / "optuna.journal")))


def _children(out: Path, name: str) -> dict[int, list]:
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(f"xlstm_tune/{name}")
    by_trial: dict[int, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get("xlstm_tune.role") == "trial" and r.data.tags.get("xlstm_tune.superseded_by_retry") != "true":
            by_trial.setdefault(int(r.data.tags["xlstm_tune.trial"]), []).append(r)
    return by_trial


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "src")


def _study(out: Path, source: Path, name: str, *extra: str) -> list[str]:
    return ["study", "--replay", str(source), "--out-dir", str(out), "--study-name", name, "--sampler", "random",
            "--seed", "4", "--n-trials", "6", "--no-progress", *extra]


def test_views_are_rebuilt_from_the_storage(tmp_path: Path, source: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(_study(out, source, "views")) == 0
    files = StudyFiles.for_study(out, "views")
    trials_before = [json.loads(x) for x in files.trials_path.read_text().splitlines()]
    summary_before = files.summary_path.read_text()
    st = optuna.load_study(study_name="views", storage=_journal(out))
    assert [r["number"] for r in trials_before] == [t.number for t in st.trials if t.state.is_finished()]
    # every view row is the storage's record (plus the MLflow run id and confirmation figures)
    for t, row in zip(st.trials, trials_before):
        stored = t.user_attrs["record"]
        assert {k: v for k, v in row.items() if k in stored} == stored
    # delete the file views and one MLflow child run; rebuild from the storage alone
    files.trials_path.unlink()
    files.summary_path.unlink()
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    gone = _children(out, "views")[1][0]
    client.delete_run(gone.info.run_id)
    capsys.readouterr()
    assert main(_study(out, source, "views", "--rebuild-views")) == 0
    said = capsys.readouterr().out
    assert "1 MLflow child run(s) logged" in said and f"{len(trials_before)} finished trial(s)" in said
    rebuilt = [json.loads(x) for x in files.trials_path.read_text().splitlines()]
    new_id = _children(out, "views")[1][0].info.run_id
    assert new_id != gone.info.run_id
    expected = [dict(r, mlflow_run_id=new_id) if r["number"] == 1 else r for r in trials_before]
    assert rebuilt == expected
    assert files.summary_path.read_text() == summary_before.replace(gone.info.run_id, new_id)
    assert all(len(v) == 1 for v in _children(out, "views").values())
    assert sorted(_children(out, "views")) == [r["number"] for r in trials_before]
    # rebuilding measured nothing: the storage holds the same trials
    assert len(optuna.load_study(study_name="views", storage=_journal(out)).trials) == len(st.trials)


def test_one_configuration_everywhere(tmp_path: Path, source: Path) -> None:
    """Optuna user attrs, trials.jsonl, summary.csv and MLflow params carry the same (canonical) knobs; the
    raw sampled values stay Optuna's params (and `sampled_<knob>` in MLflow where they differ)."""
    out = tmp_path / "out"
    assert main(_study(out, source, "canon", "--n-trials", "12")) == 0
    st = optuna.load_study(study_name="canon", storage=_journal(out))
    files = StudyFiles.for_study(out, "canon")
    rows = {int(r["number"]): r for r in csv.DictReader(files.summary_path.open())}
    lines = {r["number"]: r for r in files.read_trials()}
    children = _children(out, "canon")
    differs = 0
    for t in st.trials:
        if not t.state.is_finished():
            continue
        knobs = t.user_attrs["knobs"]
        assert {k: lines[t.number][k] for k in KNOBS} == knobs
        assert {k: rows[t.number][k] for k in KNOBS} == {k: str(v) for k, v in knobs.items()}
        params = children[t.number][0].data.params
        assert {k: params[k] for k in KNOBS} == {k: str(v) for k, v in knobs.items()}
        for k, v in t.params.items():
            if knobs.get(k) != v:
                differs += 1
                assert params[f"sampled_{k}"] == str(v)
    assert differs, "the space samples no knob that a backend ignores: the test proves nothing"


def test_a_storage_without_the_recorded_study_is_refused(tmp_path: Path, source: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(_study(out, source, "where")) == 0
    files = StudyFiles.for_study(out, "where")
    meta = json.loads(files.run_meta_path.read_text())
    assert meta["storage_record"]["study_uid"] and len(meta["storage_record"]["trials"]) >= 6
    before = {p: p.read_bytes() for p in (files.trials_path, files.summary_path, files.run_meta_path)}
    other = tmp_path / "other"
    assert main(_study(other, source, "where", "--sampler", "grid")) == 0  # same name, another study
    cases = [
        (["--storage", str(tmp_path / "fresh.journal")], "is not in the storage"),
        (["--storage", str(other / "optuna.journal")], "is another study"),
    ]
    capsys.readouterr()
    for extra, needle in cases:
        assert main(_study(out, source, "where", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "--storage" in err, err
    journal = out / "optuna.journal"
    journal.write_bytes(b"")  # emptied
    assert main(_study(out, source, "where")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not in the storage" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert journal.read_bytes() == b""
