"""configs/: shipped starting points per device class, strict reading, the config-file level of the
precedence chain on run/bench (via the CLI's parser) and on study (settings as flags, knobs measured first)."""
from __future__ import annotations

from pathlib import Path

import pytest

from xlstm_tune.cli.common import runtime_from_args
from xlstm_tune.cli.main import build_parser
from xlstm_tune.errors import UserError
from xlstm_tune.runtime.config_file import DEVICE_CLASSES, load_config, shipped_config
from xlstm_tune.study.spec import apply_overrides, load_spec

REPO = Path(__file__).resolve().parents[1]


def test_top_level_configs_mirror_the_packaged_ones() -> None:
    top = sorted(p.name for p in (REPO / "configs").glob("*.toml"))
    assert top == sorted(f"{d}.toml" for d in DEVICE_CLASSES)
    for device in DEVICE_CLASSES:
        packaged = shipped_config(device)
        assert packaged.parent.parent.name == "xlstm_tune" and packaged.is_file()
        assert packaged.read_bytes() == (REPO / "configs" / f"{device}.toml").read_bytes(), device
    assert shipped_config("cuda:1") == shipped_config("cuda")
    with pytest.raises(UserError, match="no shipped config for device type 'tpu'"):
        shipped_config("tpu")


def test_shipped_configs_are_the_documented_starting_points() -> None:
    cuda, cpu, mps = (load_config(shipped_config(d)) for d in ("cuda", "cpu", "mps"))
    assert (cuda.knobs["backend"], cuda.knobs["chunk_size"], cuda.knobs["decode_mode"]) == ("native", 128, "graph")
    assert cuda.settings["dtype"] == "bfloat16" and cuda.settings["compile"] is True
    assert (cpu.knobs["backend"], cpu.knobs["decode_mode"], cpu.settings["compile"]) == ("native", "eager", False)
    assert mps.knobs["decode_mode"] != "graph"  # MPS has no device graphs
    for cfg in (cuda, cpu, mps):
        assert set(cfg.knobs) == {"backend", "chunk_size", "heads_per_band", "workers", "t_inner", "streams",
                                  "decode_mode"}


@pytest.mark.parametrize("text,needle", [
    ("[knob]\nbackend = 'native'\n", "unknown table(s) ['knob']"),
    ("[knobs]\nchunk = 64\n", "unknown knob(s) ['chunk']"),
    ("[knobs]\nchunk_size = 1000000000000\n", "chunk_size must be <="),
    ("[runtime]\nthreads = 100000\n", "threads"),
    ("[runtime]\nturbo = true\n", "unknown runtime setting(s) ['turbo']"),
    ("[knobs\n", "not valid TOML"),
])
def test_bad_config_is_one_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


def _args(*argv: str):
    return build_parser().parse_args(["run", *argv])


def test_config_is_below_flags_best_and_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "mine.toml"
    cfg.write_text("[knobs]\nbackend = 'native'\nchunk_size = 64\nworkers = 3\n"
                   "[runtime]\ncompile = false\ntf32_cell = false\nthreads = 1\n")
    opts, s = runtime_from_args(_args("--config", str(cfg)), best=None, environ={})
    assert (opts.backend, opts.chunk_size, opts.workers, opts.compile, s.tf32_cell, s.threads) == \
        ("native", 64, 3, False, False, 1)  # the config beats the built-in defaults
    opts, s = runtime_from_args(_args("--config", str(cfg), "--chunk-size", "16", "--compile"), best=None, environ={})
    assert (opts.chunk_size, opts.compile, opts.workers) == (16, True, 3)  # a CLI flag beats the config file
    env = {"XLSTM_CHUNK_SIZE": "32", "XLSTM_TF32_CELL": "1"}
    opts, s = runtime_from_args(_args("--config", str(cfg)), best=None, environ=env)
    assert (opts.chunk_size, s.tf32_cell, opts.workers) == (32, True, 3)  # the environment beats the config file
    opts, s = runtime_from_args(_args("--config", str(cfg), "--no-tf32-cell"), best=None, environ=env)
    assert s.tf32_cell is False


def test_study_config_sets_settings_and_measures_its_knobs_first(tmp_path: Path) -> None:
    cfg = tmp_path / "mine.toml"
    cfg.write_text("[knobs]\nbackend = 'native'\nchunk_size = 64\n[runtime]\ncompile = true\ndtype = 'bf16'\n"
                   "threads = 1\nfused_decode = false\n")
    spec = load_spec(None)
    out = apply_overrides(spec, config=str(cfg), runtime={"fused_decode": True})
    assert out.model["compile"] is True and out.model["dtype"] == "bfloat16"
    assert out.runtime["threads"] == 1 and out.runtime["fused_decode"] is True  # the flag beats the file
    assert out.study["enqueue"][0] == {"backend": "native", "chunk_size": 64}
    assert spec.study["enqueue"] == [] and spec.runtime["threads"] is None  # the parsed spec is untouched
