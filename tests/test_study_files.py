"""tracking.study_files: append-only trials.jsonl that survives kills, summary.csv, atomic files."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from xlstm_tune.errors import UserError
from xlstm_tune.tracking.study_files import LEADING_COLUMNS, StudyFiles, check_study_name


def _record(n: int, **extra: object) -> dict:
    rec = {
        "number": n, "state": "COMPLETE", "backend": "queued", "workers": 2, "heads_per_band": 4,
        "chunk_size": 32, "t_inner": 4, "streams": 0, "decode_mode": "eager", "context_len": 128,
        "prefill_tok_s": 1000.0 + n, "decode_tok_s": 50.0, "prefill_s": 0.128, "decode_s": 0.32,
    }
    rec.update(extra)
    return rec


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_paths_and_study_dir(tmp_path: Path) -> None:
    sf = StudyFiles.for_study(tmp_path, "s1")
    assert sf.root == tmp_path / "studies" / "s1"
    assert sf.run_meta_path.name == "run_meta.json"
    assert sf.trials_path.name == "trials.jsonl"
    assert sf.summary_path.name == "summary.csv"
    assert sf.best_path.name == "best.json"
    sf.ensure_dirs()
    assert sf.outputs_dir.is_dir() and sf.plots_dir.is_dir()


@pytest.mark.parametrize("name", ["", "../x", "a/b", "it's", " pad"])
def test_bad_study_names(name: str) -> None:
    with pytest.raises(UserError):
        check_study_name(name)


def test_append_read_roundtrip(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path / "st")
    recs = [_record(i, fidelity={"max_rel_err": 1e-6}, tags=["a", "b"]) for i in range(3)]
    for r in recs:
        sf.append_trial(r)
    assert sf.read_trials() == recs
    lines = sf.trials_path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["number"] == i for i, line in enumerate(lines))


def test_nan_becomes_null(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path)
    sf.append_trial(_record(0, decode_tok_s=float("nan")))
    assert "NaN" not in sf.trials_path.read_text()
    assert sf.read_trials()[0]["decode_tok_s"] is None


def test_record_needs_integer_number(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path)
    with pytest.raises(ValueError):
        sf.append_trial({"state": "COMPLETE"})
    assert not sf.trials_path.exists()


def test_partial_last_line_is_skipped_and_next_append_is_clean(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path)
    sf.append_trial(_record(0))
    sf.append_trial(_record(1))
    full = json.dumps(_record(2)).encode()
    with open(sf.trials_path, "ab") as fh:  # a killed writer: half a line, no newline
        fh.write(full[: len(full) // 2])
    assert [r["number"] for r in sf.read_trials()] == [0, 1]
    # The next append must not glue itself onto the partial line.
    sf.append_trial(_record(3))
    assert [r["number"] for r in sf.read_trials()] == [0, 1, 3]


def test_duplicates_keep_last(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path)
    sf.append_trial(_record(0, state="RUNNING"))
    sf.append_trial(_record(1))
    sf.append_trial(_record(0, state="COMPLETE", prefill_tok_s=999.0))
    got = sf.read_trials()
    assert [r["number"] for r in got] == [0, 1]
    assert got[0]["state"] == "COMPLETE" and got[0]["prefill_tok_s"] == 999.0


def test_rewrite_trials_atomic(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path)
    for i in range(3):
        sf.append_trial(_record(i))
    sf.rewrite_trials([_record(0, state="FAIL"), _record(2)])
    assert [(r["number"], r["state"]) for r in sf.read_trials()] == [(0, "FAIL"), (2, "COMPLETE")]
    assert _temp_files(tmp_path) == []


def test_summary_csv_columns(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path)
    recs = [
        _record(0, fidelity={"passed": True}, zeta=1),
        _record(1, alpha="x", prefill_tok_s_p20=float("nan")),
        {"number": 2, "state": "FAIL", "fail_reason": "memory"},
    ]
    sf.write_summary_csv(recs)
    with open(sf.summary_path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    assert header[:10] == ["number", "state", "backend", "workers", "heads_per_band", "chunk_size",
                           "prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s"]
    assert header[10:14] == ["t_inner", "streams", "decode_mode", "context_len"]
    assert tuple(header[:14]) == LEADING_COLUMNS
    assert header[14:] == sorted(["alpha", "fail_reason", "fidelity", "prefill_tok_s_p20", "zeta"])
    by_name = [dict(zip(header, row)) for row in rows[1:]]
    assert json.loads(by_name[0]["fidelity"]) == {"passed": True}
    assert by_name[1]["prefill_tok_s_p20"] == ""  # NaN -> empty
    assert by_name[2]["backend"] == "" and by_name[2]["fail_reason"] == "memory"
    assert float(by_name[0]["prefill_tok_s"]) == 1000.0
    assert _temp_files(tmp_path) == []


def test_run_meta_atomic_roundtrip(tmp_path: Path) -> None:
    sf = StudyFiles(tmp_path / "s")
    assert sf.read_run_meta() is None
    sf.write_run_meta({"study": "s", "n_trials": 5, "x": math.inf})
    sf.write_run_meta({"study": "s", "n_trials": 6})
    assert sf.read_run_meta() == {"study": "s", "n_trials": 6}
    assert _temp_files(tmp_path) == []
    sf.run_meta_path.write_text("{broken")
    with pytest.raises(UserError):
        sf.read_run_meta()
