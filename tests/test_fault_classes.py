"""The failure classes the end-to-end fault test leaves out, injected for real (study.faults): a worker
that dies of SIGSEGV is a `crash` naming the signal, an exception inside the trial is an `error` with
its traceback; both are FAIL in every view (trials.jsonl, Optuna, MLflow) and the study goes on.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

from xlstm_tune.tracking.study_files import StudyFiles  # noqa: E402

pytestmark = pytest.mark.slow


def test_segfault_and_error_are_classified_and_survived(tmp_path: Path, spawn) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_", "MLFLOW_"))}
    env.update(PYTHONUNBUFFERED="1", XLSTM_TUNE_INJECT_FAULT="1:segfault,2:error")
    proc = spawn.cli("study", "--out-dir", "out", "--study-name", "classes", "--n-trials", "2", "--sampler", "random",
                     "--prefill-len", "32", "--new-tokens", "4", "--repeats", "2", "--trial-timeout", "120",
                     "--no-progress", cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["number"]: r for r in StudyFiles.for_study(tmp_path / "out", "classes").read_trials()}
    assert recs[1]["state"] == "FAIL" and recs[1]["failure_reason"] == "crash", recs[1]
    assert "SIGSEGV" in recs[1]["error"], recs[1]["error"]
    assert recs[2]["state"] == "FAIL" and recs[2]["failure_reason"] == "error", recs[2]
    assert "injected error" in recs[2]["error"] and "RuntimeError" in recs[2]["traceback"], recs[2]
    assert sum(r["state"] == "COMPLETE" for r in recs.values()) == 2  # the study went on past both
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="classes",
                              storage=JournalStorage(JournalFileBackend(str(tmp_path / "out" / "optuna.journal"))))
    states = {t.number: t.state.name for t in study.trials}
    assert states[1] == "FAIL" and states[2] == "FAIL"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("xlstm_tune/classes")
    tags = {int(r.data.tags["xlstm_tune.trial"]): r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("xlstm_tune.role") == "trial"}
    assert tags[1].data.tags["failure_reason"] == "crash" and tags[2].data.tags["failure_reason"] == "error"
    assert tags[1].info.status == "FAILED" and tags[2].info.status == "FAILED"
