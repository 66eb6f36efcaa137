"""Shared fixtures. Numerics tests draw fresh random inputs each run; the seed is in failure messages."""
from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "0")
if not torch.cuda.is_available():
    # The fused decode kernels' tests run through Triton's CPU interpreter, which has to be on before
    # anything in the session imports Triton (torch.compile does).
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="module")
def private_ray(tmp_path_factory):
    """The ray backend's private runtime in this process, with Ray's temp folder pointed at an empty one
    of ours, so that no cluster anything else runs on this machine can be found; shut down at teardown."""
    pytest.importorskip("ray")
    from xlstm_tune.runtime.ray_scheduler import shutdown_private_runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("ray")))
        mp.setenv("XLSTM_RAY_LOCAL_MODE", "1")
        mp.delenv("RAY_ADDRESS", raising=False)
        yield
        shutdown_private_runtime()
