"""The CLI as one family: descriptions, shared flag names, clean metavars, help on every flag; and `run`
with a best.json: the entry applied named once, compile as the study measured, the target checked."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import torch

from xlstm_tune.bench.workload import describe_model
from xlstm_tune.cli.main import build_parser, main
from xlstm_tune.runtime.device import device_name
from xlstm_tune.tracking.best_export import build_best, export_best

KNOBS = dict(backend="native", chunk_size=16, heads_per_band=4, workers=1, t_inner=4, streams=0, decode_mode="eager")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_a_description_and_every_flag_help_and_a_clean_metavar() -> None:
    for name, sub in _subparsers().items():
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            assert action.help, f"{name} {flag} has no help"
            if action.nargs == 0 or action.choices is not None:
                continue  # a switch, or argparse shows the choices
            # without a metavar argparse shows dest.upper(): CONTEXT_LEN, STATS_LOG, MEM_SOFT_PCT
            assert action.metavar is not None, f"{name} {flag} shows the raw metavar {action.dest.upper()}"
            assert not re.fullmatch(r"[A-Z]+(_[A-Z]+)+", str(action.metavar)), f"{name} {flag}: {action.metavar}"


def test_run_help_describes_it_and_names_new_tokens(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "generate text" in out.split("options:")[0]
    assert "--new-tokens N, --max-new-tokens N" in out
    for flag in ("--mem-soft-pct PCT", "--mem-hard-pct PCT", "--mem-soft-mb MB", "--mem-hard-mb MB"):
        assert flag in out


def test_shared_flag_spellings() -> None:
    subs = _subparsers()
    for name in ("run", "bench", "study"):
        assert subs[name].parse_args(["--new-tokens", "3"]).new_tokens == 3
    assert subs["run"].parse_args(["--max-new-tokens", "5"]).new_tokens == 5  # the old name stays an alias
    for name in ("export", "judge"):
        assert subs[name].parse_args(["--study-name", "s"]).study == "s"
    for name in ("run", "bench", "study"):
        args = subs[name].parse_args(["--config", "c.toml", "--threads", "1", "--no-fused-decode"])
        assert (args.config, args.threads, args.fused_decode) == ("c.toml", 1, False)


def _best(tmp_path: Path, *, runtime: dict, config_hash: str | None = None, device: str | None = None) -> Path:
    info = describe_model("tiny")
    data = build_best(
        [{"context_len": 128, "knobs": KNOBS, "metrics": {}, "fidelity": {"passed": True}},
         {"context_len": 512, "knobs": dict(KNOBS, chunk_size=64), "metrics": {}, "fidelity": {"passed": True}}],
        {"device_name": device or device_name("cpu"), "model_id": "tiny",
         "model_config_hash": config_hash or info["config_hash"], "study_name": "s", "trial_number": 1,
         "mlflow_run_id": None},
        runtime)
    return export_best(tmp_path / "best.json", data)


def test_run_best_applies_compile_off_and_names_the_entry_once(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               restore_process: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = _best(tmp_path, runtime={"compile": False, "threads": 1, "interop_threads": 1})
    monkeypatch.setenv("XLSTM_COMPILE", "1")  # best.json beats the environment
    rc = main(["run", "--device", "cpu", "--best", str(path), "--prompt", "Hello", "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    applied = next(line for line in out.splitlines() if line.startswith("applied from"))
    assert applied.count(str(path)) == 1 and out.count(str(path)) == 1
    assert "entry for context 128" in applied and "chunk_size=16" in applied  # the entry applied, not the prompt length
    assert "compile=False" in applied and "threads=1" in applied
    assert torch.get_num_threads() == 1
    assert "compiled calls: 0" in out  # model.stats: nothing went through torch.compile

    from xlstm_tune import load_model
    from xlstm_tune.runtime.options import RuntimeOptions

    model = load_model("tiny", device="cpu", runtime=RuntimeOptions.from_best(path, 128))
    try:
        model(model.encode("Hello"))
        stats = model.stats.as_dict()
    finally:
        model.close()
    assert stats["compiled_calls"] == 0 and stats["eager_calls"] > 0


@pytest.mark.parametrize("what", ["model", "device"])
def test_best_for_another_target_is_refused_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          restore_process: None, what: str) -> None:
    kwargs = {"config_hash": "0123456789abcdef"} if what == "model" else {"device": "NVIDIA H100 80GB HBM3"}
    path = _best(tmp_path, runtime={"compile": False}, **kwargs)
    rc = main(["run", "--device", "cpu", "--best", str(path), "--prompt", "Hi", "--new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--allow-mismatch" in err
    assert ("0123456789ab" in err) if what == "model" else ("NVIDIA H100" in err)
    rc = main(["run", "--device", "cpu", "--best", str(path), "--prompt", "Hi", "--new-tokens", "1",
               "--allow-mismatch"])
    captured = capsys.readouterr()
    assert rc == 0 and "warning: --allow-mismatch" in captured.err and "applied from best.json" in captured.out


@pytest.mark.parametrize("argv,needle", [
    (["study", "--chunk-size", "1000000000000"], "chunk_size must be <="),
    (["run", "--workers", "100000"], "workers must be <="),
    (["bench", "--threads", "100000"], "threads=100000 is outside"),
    (["run", "--config", "/nonexistent/c.toml"], "config file '/nonexistent/c.toml' not found"),
])
def test_out_of_bounds_flags_are_one_line_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a study that wrongly started would write here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []
