"""Signals through the real CLI: Ctrl-C of a study mid-trial, Ctrl-C pressed three times, the memory
watchdog's hard limit, and SIGTERM/SIGINT of the `ui` and `dashboard` servers (no process of theirs left).

Every process goes through the `spawn` fixture: its whole process group is killed at teardown.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

pytestmark = pytest.mark.slow
SMALL = ["--prefill-len", "32,64", "--new-tokens", "8", "--repeats", "2", "--no-progress"]
PROGRESS = ("[trial ", "[worker] ", "Confirmation round")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_", "MLFLOW_"))}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _messages(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith(PROGRESS)]


def _wait_for(condition, timeout: float, what: str, proc=None) -> None:
    """Poll `condition` (a state on disk or a socket; there is no event to wait on across processes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.1)


def _trial_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    data = path.read_bytes()
    return [json.loads(x) for x in data.splitlines() if x.strip()] if data.endswith(b"\n") else []


def test_ctrl_c_of_a_study_mid_trial_is_one_line_and_resumable(tmp_path: Path, spawn) -> None:
    args = ["study", "--out-dir", "out", "--study-name", "sigint", "--n-trials", "2", *SMALL]
    # trial 1 sleeps 20 s before measuring: the interrupt lands inside it
    proc = spawn([sys.executable, "-m", "xlstm_tune", *args], cwd=tmp_path, env=_env(XLSTM_TUNE_INJECT_FAULT="1:delay"),
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = tmp_path / "out" / "studies" / "sigint" / "trials.jsonl"
    _wait_for(lambda: len(_trial_lines(trials)) == 1, 600, "record of trial 0", proc)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    messages = _messages(err)
    assert messages == ["xlstm_tune study: interrupted"], err[-3000:]
    assert "Traceback" not in err
    lines = _trial_lines(trials)
    assert lines and lines[0]["number"] == 0 and lines[0]["state"] == "COMPLETE"  # intact, whole lines
    # the same command again resumes: trial 1 was interrupted and its settings run again
    again = spawn.cli(*args, cwd=tmp_path, env=_env(), timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    recs = {r["number"]: r for r in _trial_lines(trials)}
    assert recs[0]["state"] == "COMPLETE" and recs[0]["key"] == lines[0]["key"]  # kept, not re-run
    assert sum(r["state"] == "COMPLETE" for r in recs.values()) == 2


def test_three_ctrl_c_within_a_second_are_quiet(tmp_path: Path, spawn) -> None:
    stats = tmp_path / "steps.csv"
    proc = spawn([sys.executable, "-m", "xlstm_tune", "run", "--device", "cpu", "--no-compile", "--max-new-tokens",
                  "1000000", "--stats-log", str(stats)], env=_env(), cwd=tmp_path,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: stats.is_file() and len(stats.read_text().splitlines()) >= 20, 300, "20 decode steps", proc)
    for _ in range(3):
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert len(_messages(err)) == 1 and "interrupted" in err, err
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_memory_watchdog_abort_is_one_line(tmp_path: Path, spawn) -> None:
    proc = spawn.cli("run", "--device", "cpu", "--no-compile", "--max-new-tokens", "50", "--mem-hard-mb", "1",
                     "--prompt", "hi", cwd=tmp_path, env=_env(), timeout=300)
    assert proc.returncode == 1, proc.stderr
    messages = _messages(proc.stderr)
    assert len(messages) == 1 and "memory watchdog" in messages[0] and "--mem-hard-mb" in messages[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---- servers -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def _stop_server_and_check_its_group_is_gone(proc, sig: int, url: str) -> None:
    _wait_for(lambda: _answers(url), 240, f"answer from {url}", proc)
    tree = psutil.Process(proc.pid).children(recursive=True)
    groups = {os.getpgid(p.pid) for p in tree}
    assert tree and proc.pid not in groups, "the server should run in a process group of its own"
    proc.send_signal(sig)  # to our command only, as `kill -TERM PID` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    left = [p.pid for p in psutil.process_iter() if _pgid(p.pid) in groups]
    assert not left, f"processes of the server's group left: {left}"
    assert not _answers(url)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ui_stops_its_whole_server_group(tmp_path: Path, spawn, sig: int) -> None:
    from xlstm_tune.tracking.mlflow_log import StudyTracker

    out = tmp_path / "out"
    StudyTracker(f"sqlite:///{out / 'mlflow.db'}", "sig", out / "artifacts").get_or_create_experiment()
    port = _free_port()
    proc = spawn([sys.executable, "-m", "xlstm_tune", "ui", "--out-dir", str(out), "--port", str(port)], env=_env(),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _stop_server_and_check_its_group_is_gone(proc, sig, f"http://127.0.0.1:{port}/health")


def test_dashboard_stops_its_server_group(tmp_path: Path, spawn) -> None:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out = tmp_path / "out"
    out.mkdir()
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    optuna.create_study(study_name="sig", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = _free_port()
    proc = spawn([sys.executable, "-m", "xlstm_tune", "dashboard", "--out-dir", str(out), "--port", str(port)],
                 env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _stop_server_and_check_its_group_is_gone(proc, signal.SIGTERM, f"http://127.0.0.1:{port}/api/studies")
