"""Shared fixtures. Numerics tests draw fresh random inputs each run; the seed is in failure messages."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "0")
if not torch.cuda.is_available():
    # The fused decode kernels' tests run through Triton's CPU interpreter, which has to be on before
    # anything in the session imports Triton (torch.compile does).
    os.environ.setdefault("TRITON_INTERPRET", "1")


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child `python -m xlstm_tune`: this checkout first on PYTHONPATH, ahead of
    (not instead of) what the parent's PYTHONPATH holds, e.g. packages installed with `pip --target`."""
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (reported in assertion messages so a failure can be replayed)."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    random.seed(value)
    return value


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64: the project's tolerance metric."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture
def restore_process():
    """Runtime settings apply to the whole process (torch's thread count, the CUDA switches in the
    environment): put both back after a test that applies them."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def private_ray(tmp_path_factory):
    """The ray backend's private runtime in this process, with Ray's temp folder pointed at an empty one
    of ours, so that no cluster anything else runs on this machine can be found; shut down at teardown."""
    from xlstm_tune.runtime.ray_scheduler import shutdown_private_runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
        mp.setenv("XLSTM_RAY_LOCAL_MODE", "1")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield
        shutdown_private_runtime()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Spawned:
    """Processes a test started, each the leader of its own process group (its workers go in it too)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def __call__(self, args: list[str], **kwargs: Any) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        # Ctrl-C as from a terminal: a suite started in the background (`cmd &`, nohup) has SIGINT ignored,
        # and a child would inherit that and never see the interrupt the test sends
        kwargs.setdefault("preexec_fn", _default_sigint)
        proc = subprocess.Popen(args, **kwargs)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
        """`python -m xlstm_tune ARGS` to the end, like subprocess.run(capture_output=True, text=True), but
        a timeout kills the whole group (the study's workers too), not just the leader."""
        proc = self([sys.executable, "-m", "xlstm_tune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, **kwargs)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_all(self) -> None:
        for proc in self.procs:
            kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s process group (whatever of it is left, even after the leader exited), reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process in uninterruptible sleep
        pass
    for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
            stream.close()


@pytest.fixture
def spawn() -> Iterator[Spawned]:
    """Start processes with `spawn([...])` or `spawn.cli(...)`: every one is killed at teardown, pass or fail."""
    spawned = Spawned()
    try:
        yield spawned
    finally:
        spawned.kill_all()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A private PostgreSQL server on loopback for one test module (tests/pg_server.py); yields the URL of
    an empty database. Missing binaries fail the test: the README's test command installs them."""
    from pg_server import find_pg_bin, postgres_server

    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL's initdb was not found: run .ci/install-test-services (apt-get install postgresql)")
    with postgres_server(bin_dir) as url:
        yield url
