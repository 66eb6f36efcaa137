"""runtime.settings: process-wide settings validated, layered, applied (threads pinned and read back),
recorded by the trial worker; knob bounds refused in options, specs and best.json alike."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xlstm_tune.errors import UserError
from xlstm_tune.runtime.best_file import read_best
from xlstm_tune.runtime.device import available_cpus, default_threads, physical_cpus
from xlstm_tune.runtime.options import KNOB_BOUNDS, RuntimeOptions
from xlstm_tune.runtime.settings import SETTING_ENV_VARS, RuntimeSettings, resolve_runtime, settings_from_mapping
from xlstm_tune.study.spec import parse_spec
from xlstm_tune.tracking.best_export import build_best, export_best

KNOBS = dict(backend="native", chunk_size=16, heads_per_band=4, workers=1, t_inner=4, streams=0, decode_mode="eager")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---- validation ---------------------------------------------------------------------------------------
def test_settings_normalise_and_refuse_bad_values() -> None:
    s = RuntimeSettings(dtype="bf16", threads="1", tf32_cell="0")
    assert (s.dtype, s.threads, s.tf32_cell) == ("bfloat16", 1, False)
    with pytest.raises(UserError) as exc:
        RuntimeSettings(threads=available_cpus() + 1)
    assert "threads" in _one_line(exc) and "CPUs this process may use" in str(exc.value)
    with pytest.raises(UserError) as exc:
        RuntimeSettings(interop_threads=0)
    assert "interop_threads" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        RuntimeSettings(dtype="int8")
    assert "int8" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        settings_from_mapping({"threads": 1, "turbo": True}, "runtime")
    assert "turbo" in _one_line(exc)


def test_env_form_round_trips() -> None:
    s = RuntimeSettings(dtype="float16", threads=1, interop_threads=1, fused_decode=False)
    env = s.to_env()
    assert env[SETTING_ENV_VARS["fused_decode"]] == "0" and env[SETTING_ENV_VARS["threads"]] == "1"
    _, back = resolve_runtime(environ=env)
    assert back == s


def test_default_threads_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads("cpu") == physical_cpus() <= available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a fleet's share of the cores caps the default
    assert default_threads("cpu") == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads("cpu", concurrent=physical_cpus() * 4) == 1  # never below one
    assert 1 <= default_threads("cuda") <= 4 and 1 <= default_threads("mps") <= 4


def test_apply_pins_threads_and_writes_the_switches(restore_process: None) -> None:
    torch.set_num_threads(available_cpus())
    in_force = RuntimeSettings(threads=1, tf32_cell=False, triton_gemv=True).apply("cpu")
    assert torch.get_num_threads() == 1 and in_force["threads"] == 1  # read back from torch, not echoed
    assert in_force["interop_threads"] == torch.get_num_interop_threads()
    assert os.environ["XLSTM_TF32_CELL"] == "0" and os.environ["XLSTM_TRITON_GEMV"] == "1"
    in_force = RuntimeSettings().apply("cpu")  # no count given: the device's default
    assert torch.get_num_threads() == default_threads("cpu") == in_force["threads"]


# ---- precedence -----------------------------------------------------------------------------------------
def _best(tmp_path: Path, runtime: dict | None, knobs: dict | None = None) -> dict:
    data = build_best([{"context_len": 64, "knobs": knobs or KNOBS, "metrics": {}, "fidelity": {"passed": True}}],
                      {"device_name": "x", "model_id": "tiny", "model_config_hash": "h", "study_name": "s",
                       "trial_number": 0, "mlflow_run_id": None}, runtime)
    return read_best(export_best(tmp_path / "best.json", data))


def test_precedence_cli_best_env_config_default(tmp_path: Path) -> None:
    config = {"chunk_size": 64, "tf32_cell": False, "compile": False, "workers": 3}
    opts, s = resolve_runtime(config=config, environ={})
    assert (opts.chunk_size, opts.workers, opts.compile, s.tf32_cell) == (64, 3, False, False)  # config beats default
    env = {"XLSTM_CHUNK_SIZE": "32", "XLSTM_TF32_CELL": "1", "XLSTM_COMPILE": "1"}
    opts, s = resolve_runtime(config=config, environ=env)
    assert (opts.chunk_size, opts.workers, opts.compile, s.tf32_cell) == (32, 3, True, True)  # env beats config
    best = _best(tmp_path, {"compile": False, "tf32_cell": False, "threads": 1}, dict(KNOBS, chunk_size=128))
    opts, s = resolve_runtime(config=config, environ=env, best=best)
    assert (opts.chunk_size, opts.compile, s.tf32_cell, s.threads) == (128, False, False, 1)  # best beats env
    opts, s = resolve_runtime(config=config, environ=env, best=best, cli={"chunk_size": 8, "tf32_cell": True})
    assert (opts.chunk_size, opts.compile, s.tf32_cell) == (8, False, True)  # a flag beats everything


def test_from_best_applies_compile_off(tmp_path: Path) -> None:
    _best(tmp_path, {"compile": False, "threads": 1})
    assert RuntimeOptions.from_best(tmp_path / "best.json").compile is False
    _best(tmp_path, None)  # a file without `runtime` leaves compile to the lower levels
    assert RuntimeOptions.from_best(tmp_path / "best.json", base=RuntimeOptions(compile=True)).compile is True


# ---- bounds ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob,value", [("chunk_size", 10**12), ("workers", 100000), ("streams", 1000),
                                        ("heads_per_band", 10**9), ("chunk_size", 0)])
def test_knob_bounds_in_options(knob: str, value: int) -> None:
    with pytest.raises(UserError) as exc:
        RuntimeOptions(**{**KNOBS, knob: value, "t_inner": 1})
    assert knob in _one_line(exc)


def test_knob_bounds_in_specs() -> None:
    high = KNOB_BOUNDS["chunk_size"][1]
    for space in ({"chunk_size": [16, 10**12]}, {"chunk_size": {"low": 16, "high": high * 2}},
                  {"workers": [1, 10**6]}):
        with pytest.raises(UserError) as exc:
            parse_spec({"space": space}, "x.toml")
        assert "x.toml" in _one_line(exc) and "must be <=" in str(exc.value)
    with pytest.raises(UserError) as exc:
        parse_spec({"space": {"chunk_size": [16]}, "runtime": {"threads": available_cpus() + 1}}, "x.toml")
    assert "[runtime]" in _one_line(exc) and "threads" in str(exc.value)
    with pytest.raises(UserError) as exc:
        parse_spec({"space": {"chunk_size": [16]}, "runtime": {"thread": 1}}, "x.toml")
    assert "unknown key(s) ['thread']" in _one_line(exc)


def test_knob_bounds_and_unknown_keys_in_best_json(tmp_path: Path) -> None:
    good = _best(tmp_path, {"compile": False})
    for change, needle in (
        (lambda d: d["contexts"][0]["knobs"].update(chunk_size=10**30, t_inner=1), "chunk_size must be <="),
        (lambda d: d.update(turbo=True), "unknown top-level key(s) ['turbo']"),
        (lambda d: d["runtime"].update(warp=9), "unknown runtime setting(s) ['warp']"),
        (lambda d: d["runtime"].update(threads=available_cpus() + 1), "threads"),
    ):
        import copy
        import json

        bad = copy.deepcopy(good)
        change(bad)
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(UserError) as exc:
            read_best(tmp_path / "bad.json")
        assert needle in _one_line(exc)


# ---- the trial worker pins and records ------------------------------------------------------------------
@pytest.mark.slow
def test_trial_worker_pins_threads_and_records_them(tmp_path: Path) -> None:
    from xlstm_tune.study.worker import TrialWorker

    setup = {
        "model": "tiny", "device": "cpu", "dtype": "float32", "compile": False, "model_seed": 0,
        "context_lens": [32], "new_tokens": 2, "decode_context_len": None, "prompt_text": None,
        "prompt_origin": "synthetic", "prompt_seed": 0,
        "bench": {"warmup": 0, "repeats": 1, "max_cv": 10.0, "max_rounds": 1, "busy_retries": 0},
        "runtime": {"threads": 1, "interop_threads": 1, "fused_decode": False},
        "fidelity": {"rel_tol": 1e-4, "min_greedy_agreement": None, "prompt_len": 16, "decode_steps": 1},
        "reference_path": str(tmp_path / "reference.pt"), "outputs_dir": str(tmp_path / "outputs"),
        "quality": {"perplexity": False},
    }
    worker = TrialWorker(setup, tmp_path / "workers", start_timeout_s=300)
    try:
        info = worker.start()
        assert info["runtime"]["threads"] == 1 and info["runtime"]["interop_threads"] == 1
        assert info["runtime"]["compile"] is False and info["runtime"]["fused_decode"] is False
        reply = worker.request({"cmd": "trial", "number": 0, "knobs": KNOBS, "fault": None}, 300, "trial 0")
    finally:
        worker.close()
    assert reply["runtime"]["threads"] == 1 and reply["metrics"]["threads"] == 1
    assert reply["metrics"]["interop_threads"] == 1
    assert "prefill_other_cpu_frac_ctx32" in reply["metrics"] and "busy_machine" in reply["metrics"]
