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


@pytest.fixture
def restore_process():
    """Runtime settings apply to the whole process (torch's thread count, the CUDA switches in the
    environment): put both back after a test that applies them."""
    threads, environ = torch.get_num_threads(), dict(os.environ)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environ)
