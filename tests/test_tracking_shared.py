"""Shared MLflow tracking: several processes on one fresh store, a real `mlflow server`, a PostgreSQL backend.

Every server here is started by the test on loopback with its own temporary folder and port, and killed
(its whole process group) at teardown, pass or fail.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from xlstm_tune.tracking.mlflow_log import (  # noqa: E402
    TAG_PARENT,
    TAG_TRIAL,
    StudyTracker,
    with_installed_driver,
)

N_PROCS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what: str, deadline_s: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Poll `check` until it holds (a server coming up); fail with `what` if the deadline or the process ends."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"{what}: not ready after {deadline_s:g} s")


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# ---- several processes open one fresh store together ---------------------------------------------
def _open_together(uri: str, artifacts: str, barrier, n: int, results) -> None:
    barrier.wait()  # everyone reaches MLflow's schema creation at the same moment
    try:
        tr = StudyTracker(uri, "race", artifacts)
        tr.start_parent("race-study")
        run_id = tr.log_trial(n, {"chunk_size": 16 * (n + 1)}, {"prefill_tok_s": float(n)}, {}, [], status="FINISHED")
        results.put((n, "ok", run_id))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put((n, "error", f"{type(exc).__name__}: {exc}"))


def _race(uri: str, artifacts: Path) -> list[tuple]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(N_PROCS), ctx.Queue()
    procs = [ctx.Process(target=_open_together, args=(uri, str(artifacts), barrier, n, results)) for n in range(N_PROCS)]
    for p in procs:
        p.start()
    try:
        out = [results.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert [p.exitcode for p in procs] == [0] * N_PROCS
        return sorted(out)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def _check_race(uri: str, out: list[tuple]) -> None:
    errors = [o for o in out if o[1] != "ok"]
    assert not errors, errors
    tr = StudyTracker(uri, "race")
    tr.start_parent("race-study")
    runs = tr.find_trial_runs()
    assert sorted(runs) == list(range(N_PROCS))
    assert {runs[n].info.run_id for n in runs} == {o[2] for o in out}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # All of them logged under one parent (the others' duplicates were dropped).
    parents = tr.client.search_runs([tr.experiment_id], filter_string="tags.`xlstm_tune.role` = 'parent'")
    assert [p.info.run_id for p in parents] == [tr.parent_run_id]
    assert {r.data.tags[TAG_PARENT] for r in runs.values()} == {tr.parent_run_id}


def test_processes_starting_together_on_a_fresh_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    _check_race(uri, _race(uri, tmp_path / "artifacts"))
    assert (tmp_path / "fresh" / "mlflow.db.schema.lock").is_file()  # the schema was created under the lock


# ---- a real `mlflow server` on loopback ------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, "mlflow server", 180, proc)
        yield url
    finally:
        kill_group(proc)
        log.close()


def test_tracking_through_an_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    tr = StudyTracker(mlflow_server, "served")
    tr.start_parent("served-study")
    out = tmp_path / "continuation.txt"
    out.write_text("served text")
    run_id = tr.log_trial(0, {"chunk_size": 32}, {"prefill_tok_s": 12.5}, {}, [out], status="FINISHED",
                          started_at=1772359200.0, finished_at=1772359230.0)
    # A second, independent client (another worker) sees the same study through the server.
    other = StudyTracker(mlflow_server, "served")
    assert other.start_parent("served-study") == tr.parent_run_id
    run = other.find_trial_runs()[0]
    assert run.info.run_id == run_id and run.data.metrics == {"prefill_tok_s": 12.5}
    assert (run.info.start_time, run.info.end_time) == (1772359200000, 1772359230000)
    got = Path(other.client.download_artifacts(run_id, "continuation.txt", str(tmp_path / "dl")))
    assert got.read_text() == "served text"  # artifacts travel through the server, not a shared folder


# ---- PostgreSQL ------------------------------------------------------------------------------------

def test_postgresql_url_uses_the_installed_driver() -> None:
    import importlib.util

    url = with_installed_driver("postgresql://u@h:5432/db")
    if importlib.util.find_spec("psycopg2") is None:
        assert url == "postgresql+psycopg://u@h:5432/db"
    assert with_installed_driver("sqlite:///x.db") == "sqlite:///x.db"
    assert with_installed_driver("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_processes_starting_together_on_a_fresh_postgresql_store(pg_url: str, tmp_path: Path) -> None:
    uri = pg_url  # a fresh database: MLflow's schema is created by the racing processes
    _check_race(uri, _race(uri, tmp_path / "artifacts"))
    tr = StudyTracker(uri, "race")
    tr.start_parent("race-study")
    (run,) = [r for r in tr.find_trial_runs().values() if r.data.tags[TAG_TRIAL] == "0"]
    assert run.data.params == {"chunk_size": "16"}
