"""A fake-but-real study folder for the judge/plot/report tests.

Real files written through StudyFiles, real output texts, and a real sqlite MLflow store with a parent
run and one child run per trial written through StudyTracker. Creating an MLflow schema takes seconds,
so tests copy a schema-only template database (built once per module) instead of building their own.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.tracking.mlflow_log import StudyTracker, default_artifact_root, default_tracking_uri
from xlstm_tune.tracking.study_files import StudyFiles

PROMPT = "Rivers carry water from the mountains to the sea."
OUTPUTS = {
    0: " Mountains feed the rivers with snowmelt, and the water reaches the sea after long journeys.",
    1: " the sea the sea the sea the sea the sea the sea the sea the sea",
    2: " Along the way, rivers cut valleys and carry sediment that builds deltas near the coast.",
}
KNOBS = [
    dict(backend="native", chunk_size=64, heads_per_band=4, workers=1, t_inner=4, streams=0, decode_mode="eager"),
    dict(backend="queued", chunk_size=32, heads_per_band=2, workers=4, t_inner=8, streams=0, decode_mode="compiled"),
    dict(backend="queued", chunk_size=64, heads_per_band=1, workers=2, t_inner=4, streams=1, decode_mode="graph"),
    dict(backend="ray", chunk_size=16, heads_per_band=4, workers=1, t_inner=2, streams=0, decode_mode="eager"),
]


def make_template_store(root: Path) -> Path:
    """A sqlite MLflow database with the schema created (the slow part), to be copied per test."""
    StudyTracker(f"sqlite:///{root / 'mlflow.db'}", "template", root / "artifacts").get_or_create_experiment()
    return root / "mlflow.db"


@dataclass
class FakeStudy:
    out_dir: Path
    name: str
    files: StudyFiles
    records: list[dict[str, Any]]
    child_ids: dict[int, str] = field(default_factory=dict)
    parent_id: str | None = None
    tracking_uri: str | None = None


def make_study(
    out_dir: Path,
    name: str = "demo",
    template_db: Path | None = None,
    prompt: str | None = PROMPT,
    experiment: str = "xlstm_tune",
) -> FakeStudy:
    """Four trials: 0-2 complete with outputs, 3 failed without one.

    MLflow (when ``template_db`` is given): trial 0's record carries its child run id, trial 1's
    record none, trial 2's a stale id (both must be found by tag); the parent run is FINISHED.
    """
    sf = StudyFiles.for_study(out_dir, name).ensure_dirs()
    meta: dict[str, Any] = {"study_name": name, "model": "tiny"}
    if prompt is not None:
        meta["spec"] = {"workload": "short", "prompt": prompt}  # nested: the judge must find it
    sf.write_run_meta(meta)
    for n, text in OUTPUTS.items():
        (sf.outputs_dir / f"trial_{n}.txt").write_text(text, encoding="utf-8")
    (sf.outputs_dir / "notes.txt").write_text("not an output")

    records: list[dict[str, Any]] = []
    for n, knobs in enumerate(KNOBS):
        rec: dict[str, Any] = {"number": n, "state": "COMPLETE" if n < 3 else "FAIL", **knobs}
        if n < 3:
            rec.update(prefill_tok_s=1000.0 * (n + 1), decode_tok_s=50.0 + 10 * n, decode_tok_s_p20=48.0 + 10 * n,
                       decode_tok_s_p80=52.0 + 10 * n, decode_tok_s_cv=0.02, fidelity_passed=True,
                       fidelity_rel_err=1e-6 * (n + 1))
        else:
            rec.update(fail_reason="out of memory")
        records.append(rec)
    study = FakeStudy(out_dir, name, sf, records)

    if template_db is not None:
        shutil.copyfile(template_db, out_dir / "mlflow.db")
        uri = default_tracking_uri(out_dir)
        tracker = StudyTracker(uri, experiment, default_artifact_root(out_dir))
        study.parent_id = tracker.start_parent(name, params={"n_trials": 4})
        for rec in records:
            n = rec["number"]
            metrics = {k: rec.get(k) for k in ("prefill_tok_s", "decode_tok_s")}
            study.child_ids[n] = tracker.log_trial(
                n, params={k: rec[k] for k in KNOBS[0]}, metrics=metrics,
                status="FINISHED" if n < 3 else "FAILED",
            )
        tracker.end_parent("FINISHED")
        records[0]["mlflow_run_id"] = study.child_ids[0]
        records[2]["mlflow_run_id"] = "0" * 32  # stale: the run does not exist
        study.tracking_uri = uri
    for rec in records:
        sf.append_trial(rec)
    sf.write_summary_csv(records)
    return study
