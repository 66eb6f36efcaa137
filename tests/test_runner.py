"""`python -m xlstm_tune run` end to end, as a subprocess."""
from __future__ import annotations

import contextlib
import csv
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from xlstm_tune.bench.workload import describe_model
from xlstm_tune.runtime.device import device_name
from xlstm_tune.runtime.ray_scheduler import MAX_TEMP_ROOT_CHARS
from xlstm_tune.tracking.best_export import build_best, export_best

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def _run(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xlstm_tune", "run", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def test_run_prints_speeds_and_writes_stats_csv(tmp_path):
    stats = tmp_path / "logs" / "steps.csv"
    proc = _run("--prompt", "Hello there", "--max-new-tokens", "12", "--backend", "queued", "--no-compile",
                "--chunk-size", "4", "--t-inner", "2", "--heads-per-band", "3", "--stats-log", str(stats),
                "--mem-log", str(tmp_path / "mem.csv"), "--mem-every", "5")
    assert proc.returncode == 0, proc.stderr
    assert "prefill:" in proc.stdout and "decode:" in proc.stdout and "tok/s" in proc.stdout
    assert "backend=queued chunk_size=4 heads_per_band=3" in proc.stdout
    rows = list(csv.DictReader(stats.open()))
    assert list(rows[0]) == ["step", "dt_ms", "cum_ms", "inst_tok_s", "avg_tok_s"]
    assert [int(r["step"]) for r in rows] == list(range(1, 12))
    cum = [float(r["cum_ms"]) for r in rows]
    assert cum == sorted(cum) and abs(cum[-1] - sum(float(r["dt_ms"]) for r in rows)) < 0.01 * cum[-1] + 0.01
    assert (tmp_path / "mem.csv").read_text().startswith("time_s,watched_used_mb")


def test_run_applies_best_json_and_cli_overrides_it(tmp_path):
    knobs = dict(backend="queued", chunk_size=6, heads_per_band=1, workers=2, t_inner=3, streams=0, decode_mode="eager")
    other = dict(knobs, chunk_size=16, t_inner=8)
    best = build_best(
        [{"context_len": 8, "knobs": knobs, "metrics": {}, "fidelity": {"passed": True}},
         {"context_len": 4096, "knobs": other, "metrics": {}, "fidelity": {"passed": True}}],
        {"device_name": device_name("cpu"), "model_id": "tiny", "model_config_hash": describe_model("tiny")["config_hash"],
         "study_name": "s", "trial_number": 1, "mlflow_run_id": None},
    )
    path = export_best(tmp_path / "best.json", best)
    proc = _run("--best", str(path), "--prompt", "short", "--max-new-tokens", "3", "--no-compile")
    assert proc.returncode == 0, proc.stderr
    assert "applied from best.json" in proc.stdout
    assert "backend=queued chunk_size=6 heads_per_band=1 workers=2 t_inner=3" in proc.stdout  # nearest context (5 tokens)
    proc = _run("--best", str(path), "--context-len", "4000", "--workers", "3", "--prompt", "short", "--max-new-tokens", "3", "--no-compile")
    assert proc.returncode == 0, proc.stderr
    assert "chunk_size=16 heads_per_band=1 workers=3 t_inner=8" in proc.stdout  # CLI flag beats best.json


@pytest.mark.parametrize("args,fragment", [
    (["--chunk-size", "10", "--t-inner", "3"], "t_inner=3 must divide chunk_size=10"),
    (["--backend", "warp"], "unknown backend"),
    (["--device", "cuda"], "cuda"),
    (["--model", "no-such-model"], "neither a preset"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "cannot read --prompt-file"),
    (["--mem-hard-pct", "150"], "pct"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--best", "/nonexistent/best.json"], "best.json not found"),
])
def test_bad_flags_one_line_exit_2(args, fragment, tmp_path):
    stats = tmp_path / "stats.csv"
    proc = _run(*args, "--stats-log", str(stats))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not stats.exists()  # nothing written half-way


def test_corrupt_best_json_is_rejected(tmp_path):
    (tmp_path / "best.json").write_text('{"schema": "xlstm_tune.best/9"}')
    proc = _run("--best", str(tmp_path / "best.json"))
    assert proc.returncode == 2 and "unknown schema" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_cleanly_and_keeps_the_log(tmp_path, spawn):
    stats = tmp_path / "steps.csv"
    proc = spawn([sys.executable, "-m", "xlstm_tune", "run", "--device", "cpu", "--no-compile",
                  "--max-new-tokens", "1000000", "--stats-log", str(stats)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)  # killed at teardown, pass or fail
    deadline = time.time() + 120
    while time.time() < deadline and (not stats.exists() or len(stats.read_text().splitlines()) < 20):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    lines = stats.read_text().splitlines()
    assert lines[0] == "step,dt_ms,cum_ms,inst_tok_s,avg_tok_s" and len(lines) >= 20
    assert all(len(line.split(",")) == 5 for line in lines)  # every line complete


@contextlib.contextmanager
def _adopting_orphans():
    """Make this process the reaper of orphans among its descendants (Linux), so that whatever a
    subprocess leaves behind stays visible as our descendant; kill those at the end, pass or fail.
    Yields the pids of the descendants that existed before."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield before
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for p in leftovers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(leftovers, timeout=30)


@pytest.fixture
def decoy_ray_cluster():
    """Another Ray cluster on this machine (`ray start --head`, loopback, its own temp folder), as a user
    of this machine may run one: the ray backend must neither join it nor hang on it."""
    folder = tempfile.mkdtemp(prefix="decoy-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**ENV, "RAY_TMPDIR": folder, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with _adopting_orphans():
        head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                 f"--port={port}", "--node-ip-address=127.0.0.1", f"--temp-dir={folder}",
                                 "--include-dashboard=false", "--num-cpus=0", "--disable-usage-stats"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        started = threading.Event()

        def watch() -> None:
            for line in head.stdout:
                if "Ray runtime started" in line:
                    started.set()

        threading.Thread(target=watch, daemon=True).start()
        try:
            assert started.wait(180), "the decoy Ray cluster did not start"
            yield port, head
        finally:
            head.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(30)
            shutil.rmtree(folder, ignore_errors=True)


def test_ray_that_cannot_start_is_a_clear_error(tmp_path, decoy_ray_cluster):
    """XLSTM_RAY_LOCAL_MODE=0 joins the running cluster that RAY_ADDRESS or `ray start` names. With
    none named, the run says so in one line at once, although another cluster runs on the machine."""
    port, head = decoy_ray_cluster
    (tmp_path / "ray").mkdir()
    env = {**ENV, "XLSTM_RAY_LOCAL_MODE": "0", "RAY_ADDRESS": "", "RAY_TMPDIR": str(tmp_path / "ray")}
    proc = subprocess.run([sys.executable, "-m", "xlstm_tune", "run", "--device", "cpu", "--backend", "ray", "--no-compile",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Ray could not start" in lines[0] and "none found" in lines[0], proc.stderr
    assert "--backend queued" in lines[0]
    assert head.poll() is None  # the other cluster was left alone
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    # an address where nothing listens: one line too, after a short connection attempt
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "xlstm_tune", "run", "--device", "cpu", "--backend", "ray", "--no-compile",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120,
                          env={**env, "RAY_ADDRESS": f"127.0.0.1:{closed}"}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"nothing answers at 127.0.0.1:{closed}" in lines[0], proc.stderr


@pytest.fixture
def short_tmp():
    """A temp folder with a short path (Ray's socket paths under it must fit 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="xrt-", dir="/tmp"))
    assert len(str(folder)) <= MAX_TEMP_ROOT_CHARS  # so the private runtime's folder goes in here
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_ray_backend_runs_end_to_end_and_shuts_down(short_tmp):
    """The private runtime's processes are gone when `run` exits, and so is its folder."""
    env = {**ENV, "TMPDIR": str(short_tmp), "RAY_TMPDIR": str(short_tmp), "RAY_ADDRESS": ""}
    with _adopting_orphans() as before:
        proc = subprocess.run([sys.executable, "-m", "xlstm_tune", "run", "--device", "cpu", "--backend", "ray",
                               "--no-compile", "--heads-per-band", "2", "--chunk-size", "8", "--t-inner", "4",
                               "--max-new-tokens", "4", "--prompt", "ray test"],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "mlstm.step_block.eager" in proc.stdout
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        _, alive = psutil.wait_procs(left, timeout=60)  # orphans of the run are ours now: none may live on
        assert not alive, [p.name() for p in alive]
    assert not list(short_tmp.glob("xlstm-ray-*"))  # the private runtime's folder was removed
