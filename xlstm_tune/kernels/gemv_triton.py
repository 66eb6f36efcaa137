"""Batch-1 matrix-vector product as a Triton kernel, for bandwidth-bound decode on CUDA.

At batch 1 every weight byte is read once per token, so decode speed is weight bytes / bandwidth. A
GEMM library's M=1 path leaves bandwidth unused; this kernel streams each weight row block once with
wide coalesced loads, accumulates in float32, and reduces once at the end. Only imported where
`runtime.device.matvec_fn` says Triton and CUDA are there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8) for s in (2, 4)
    if bn * bk <= 8192
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T (+ bias) for x with a single row ([..., K], prod(leading dims) == 1)."""
    K = x.shape[-1]
    N = weight.shape[0]
    xv = x.reshape(K)
    if not xv.is_contiguous():
        xv = xv.contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](xv, weight, y, N, K, weight.stride(0))
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], N)
