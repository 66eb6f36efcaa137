"""The split-K kernel of benchmarks/gemv_probe.py computes the product it is timed against."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmark_scripts import load_benchmark
from conftest import rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA, Triton's interpreter (conftest)


@pytest.mark.parametrize("n,k,split,block_n,block_k", [(40, 300, 2, 8, 128), (64, 1000, 4, 4, 128), (33, 96, 4, 8, 32)],
                         ids=["ragged-tile", "four-slices", "an-empty-slice"])
def test_split_k_matches_float64_and_leaves_its_counters_at_zero(seed, n, k, split, block_n, block_k):
    import triton

    probe = load_benchmark("gemv_probe")
    w = torch.randn(n, k, device=DEVICE).to(torch.bfloat16)
    x = torch.randn(k, device=DEVICE).to(torch.bfloat16)
    counts = torch.zeros(triton.cdiv(n, block_n), dtype=torch.int32, device=DEVICE)
    parts = torch.empty(split, n, device=DEVICE)
    for _ in range(2):  # the second call on the same counters
        y = torch.empty(n, device=DEVICE)
        probe._gemv_split_k[(triton.cdiv(n, block_n), split)](x, w, y, parts, counts, n, k, w.stride(0), SPLIT=split,
                                                             BLOCK_N=block_n, BLOCK_K=block_k)
        assert rel_err(y, w.double() @ x.double()) < 1e-5, f"seed={seed}"
        assert not counts.any()
