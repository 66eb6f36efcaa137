"""tracking.best_export: build/export/check best.json, clear errors for bad files, from_best picks a context."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xlstm_tune.bench.stats import summarize
from xlstm_tune.errors import UserError
from xlstm_tune.runtime.best_file import SCHEMA
from xlstm_tune.runtime.options import RuntimeOptions
from xlstm_tune.tracking.best_export import build_best, check_best, export_best
from xlstm_tune.tracking.provenance import config_hash, git_commit, now_iso

KNOBS_SHORT = {"backend": "queued_compiled_steps", "chunk_size": "64", "heads_per_band": 2, "workers": 2,
               "t_inner": 8, "streams": 0, "decode_mode": "compiled"}
KNOBS_LONG = {"backend": "native", "chunk_size": 128, "heads_per_band": 4, "workers": 1,
              "t_inner": 16, "streams": 0, "decode_mode": "eager", "compile": True}


def _provenance() -> dict:
    return {
        "device_name": "cpu", "model_id": "tiny", "model_config_hash": config_hash({"d": 64, "heads": 4}),
        "study_name": "s", "trial_number": 7, "mlflow_run_id": "abc",
    }


def _built() -> dict:
    return build_best(
        [
            {"context_len": 8192, "knobs": KNOBS_LONG, "metrics": {"prefill_tok_s": summarize([9.0, 10.0, 11.0])},
             "fidelity": {"passed": True, "max_rel_err": 3e-6}, "trial_number": 7, "mlflow_run_id": "abc"},
            {"context_len": 2048, "knobs": KNOBS_SHORT,
             "metrics": {"prefill_tok_s": {"median": 5.0, "p20": 4.0, "p80": 6.0, "cv": 0.1}, "compile_s": 2.5},
             "fidelity": {"passed": True, "max_rel_err": float("nan")}, "trial_number": 3, "mlflow_run_id": "def"},
        ],
        _provenance(),
    )


def test_build_export_check_roundtrip(tmp_path: Path) -> None:
    data = _built()
    assert data["schema"] == SCHEMA
    assert [c["context_len"] for c in data["contexts"]] == [2048, 8192]  # ascending
    short = data["contexts"][0]
    assert short["knobs"] == {"backend": "queued", "chunk_size": 64, "heads_per_band": 2, "workers": 2,
                              "t_inner": 8, "streams": 0, "decode_mode": "compiled"}
    assert short["env"]["XLSTM_CHUNKWISE_BACKEND"] == "chunkwise--queued_compiled_steps"
    assert short["env"]["XLSTM_T_INNER"] == "8" and "XLSTM_COMPILE" not in short["env"]
    assert short["fidelity"]["max_rel_err"] is None  # NaN is not valid JSON
    long = data["contexts"][1]
    assert "compile" not in long["knobs"]
    assert long["metrics"]["prefill_tok_s"]["median"] == 10.0 and long["metrics"]["prefill_tok_s"]["p20"] == pytest.approx(9.4)
    prov = data["provenance"]
    assert prov["time"] and prov["os"] and "git_commit" in prov and prov["torch_version"]

    path = export_best(tmp_path / "studies" / "s" / "best.json", data)
    assert [p.name for p in path.parent.iterdir()] == ["best.json"]  # no temp file left
    text = path.read_text()
    assert "NaN" not in text
    # What was written is what was built, field for field (a writer that drops or alters a field fails
    # here), and the checker returns that same content.
    assert json.loads(text) == data
    assert check_best(path) == data
    # The env form reproduces the knobs.
    env_opts = RuntimeOptions.from_env(short["env"])
    assert env_opts.knobs() == short["knobs"]


def test_from_best_nearest_context(tmp_path: Path) -> None:
    path = export_best(tmp_path / "best.json", _built())
    assert RuntimeOptions.from_best(path, 1000).chunk_size == 64
    assert RuntimeOptions.from_best(path, 4000).chunk_size == 64
    assert RuntimeOptions.from_best(path, 6000).chunk_size == 128
    assert RuntimeOptions.from_best(path, 5120).chunk_size == 128  # tie goes to the longer context
    assert RuntimeOptions.from_best(path, None).backend == "native"  # longest measured


def _one_line_user_error(path: Path) -> str:
    with pytest.raises(UserError) as exc:
        check_best(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    with pytest.raises(UserError):
        RuntimeOptions.from_best(path)
    return msg


def test_corrupt_json(tmp_path: Path) -> None:
    p = tmp_path / "best.json"
    p.write_text('{"schema": "xlstm_tune.best/1", "contexts": [')
    assert "not valid JSON" in _one_line_user_error(p)


def test_wrong_schema(tmp_path: Path) -> None:
    data = _built()
    data["schema"] = "xlstm_tune.best/0"
    p = tmp_path / "best.json"
    p.write_text(json.dumps(data))
    assert "schema" in _one_line_user_error(p)


def test_missing_knob(tmp_path: Path) -> None:
    data = _built()
    del data["contexts"][0]["knobs"]["t_inner"]
    p = tmp_path / "best.json"
    p.write_text(json.dumps(data))
    assert "t_inner" in _one_line_user_error(p)
    with pytest.raises(UserError, match="missing knob"):
        build_best([{"context_len": 1, "knobs": {"backend": "native"}, "metrics": {}, "fidelity": {}}], _provenance())


def test_invalid_knob(tmp_path: Path) -> None:
    data = _built()
    data["contexts"][0]["knobs"]["t_inner"] = 5  # does not divide chunk_size 64
    p = tmp_path / "best.json"
    p.write_text(json.dumps(data))
    assert "t_inner=5 must divide chunk_size=64" in _one_line_user_error(p)
    with pytest.raises(UserError):
        export_best(tmp_path / "other.json", data)  # write_best validates: nothing written
    assert not (tmp_path / "other.json").exists()
    with pytest.raises(UserError):
        build_best([{"context_len": 1, "knobs": {**KNOBS_SHORT, "t_inner": 5}, "metrics": {}, "fidelity": {}}],
                   _provenance())


def test_build_rejects_unknown_knob_and_missing_provenance() -> None:
    with pytest.raises(UserError, match="unknown knob"):
        build_best([{"context_len": 1, "knobs": {**KNOBS_SHORT, "turbo": 1}, "metrics": {}, "fidelity": {}}],
                   _provenance())
    prov = _provenance()
    del prov["model_id"]
    with pytest.raises(UserError, match="model_id"):
        build_best([{"context_len": 1, "knobs": KNOBS_SHORT, "metrics": {}, "fidelity": {}}], prov)
    with pytest.raises(UserError):
        build_best([], _provenance())


def test_provenance_helpers(tmp_path: Path) -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 16
    assert git_commit(tmp_path) is None  # not a repository
    assert now_iso().endswith("+00:00")
