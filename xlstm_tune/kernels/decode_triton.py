"""Fused decode kernels (Triton): five launches per mLSTM block instead of a dozen, at batch 1 to 16.

At batch 1 a decode step reads every weight once, so its floor is weight bytes / memory bandwidth;
what it costs beyond that is launches and the small elementwise kernels between the matrix-vector
products. These kernels fold that elementwise work into the products' prologues and epilogues:

    fused_gemv    y = W @ prologue(x) (+ bias), then an epilogue
                  prologue: none | RMS norm | per-head layer norm times sigmoid(output gate)
                  epilogue: none | + residual | SwiGLU pair silu(W_g x) * (W_u x) | soft cap
    mlstm_cell    per head, value tile and row: gate soft caps, max-state m, n and the read-out denominator,
                  C in place and h = q^T C / denominator (n and m in place by the head's last program)
    argmax_rows   the greedy next token of each row, so a captured step can feed its own next input

For B > 1 rows the products run as a small-M GEMM (`_fused_rows_kernel`): each program reads its weight
tile once and applies it to all B rows (up to 16 per program, tensor-core `tl.dot`), so a step still
reads every weight once and stays bandwidth-bound; the per-head norm prologue becomes its own small
kernel there. Batch 1 keeps the GEMV kernel, which a 16-row tile would only slow down.

All arithmetic is float32 whatever the weight dtype (rows of B > 1 are rounded to a half weight dtype
before their product, as the plain step's linear rounds its input; the sums stay float32). Only imported where
`runtime.device.fused_decode_kernels` finds CUDA and Triton (or Triton's interpreter, for tests).
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from xlstm_tune.kernels.decode_tiles import ShapeKey, Tile, load_tiles

PRO_NONE, PRO_RMS, PRO_HEAD_NORM = 0, 1, 2
EPI_NONE, EPI_RESIDUAL, EPI_SWIGLU, EPI_SOFT_CAP = 0, 1, 2, 3

# Few configurations: every (shape, prologue, epilogue) key is tuned once per process, before capture.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 8, 2), (16, 256, 8, 3),
                         (2, 1024, 4, 3), (4, 1024, 8, 2)]
]
# Rows of B > 1: tl.dot wants tiles of at least 16 along each side, so BLOCK_N starts at 16.
_ROWS_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(16, 256, 4, 3), (16, 512, 4, 3), (32, 128, 4, 3), (32, 256, 4, 3), (32, 256, 8, 3),
                         (64, 128, 4, 3), (64, 256, 8, 2)]
]
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if _INTERPRETED:  # Triton's CPU interpreter (tests) cannot time configurations
    _CONFIGS = _CONFIGS[2:3]
    _ROWS_CONFIGS = _ROWS_CONFIGS[2:3]
# Batch-1 product tiles fixed per shape instead of autotuned: the shipped decode_tiles.json entries of the
# running GPU, and PINNED, which tools and tests set in-process (it wins). pinned_launches counts the
# products launched with a fixed tile, per shape: what ran, not what was asked for (a captured graph's
# replays rerun its launches without passing here).
PINNED: dict[ShapeKey, Tile] = {}
pinned_launches: Counter[ShapeKey] = Counter()
ROWS_PER_PROGRAM = 16  # batch rows one program of the rows kernel applies its weight tile to
MAX_FUSED_BATCH = 16  # the fused step's batch range: beyond it, weight tiles would be read once per 16 rows


@functools.lru_cache(maxsize=None)
def _hopper_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _shipped_tiles(device_index: int) -> dict[ShapeKey, Tile]:
    return load_tiles().get(torch.cuda.get_device_name(device_index), {})


def pinned_tile(x: Tensor, key: ShapeKey) -> Tile | None:
    """The fixed tile of a batch-1 product of this shape on x's device, or None (autotune it)."""
    if key in PINNED:
        return PINNED[key]
    if _INTERPRETED:  # no GPU to have pinned tiles for
        return None
    return _shipped_tiles(x.device.index if x.device.index is not None else torch.cuda.current_device()).get(key)


def _pdl(t: Tensor) -> bool:
    """Whether to launch with programmatic dependent launch (Hopper and newer; XLSTM_DECODE_PDL=0: off).

    A decode step is a chain of small kernels, each a few microseconds of weight reads: launched this way a
    kernel is scheduled while the one before drains, so the gap between them shrinks. Every kernel then
    waits (`_wait_for_prior`) before it touches anything another kernel writes.
    """
    return (not _INTERPRETED and t.is_cuda and os.environ.get("XLSTM_DECODE_PDL", "1").strip() != "0"
            and _hopper_or_newer(t.device.index if t.device.index is not None else torch.cuda.current_device()))


@triton.jit
def _wait_for_prior(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the kernel before has finished and its writes are
    visible, then let the next kernel launch (it waits the same way). Called before any load or store."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# K is a compile-time constant: each product shape compiles once anyway (autotuning is per shape), and
# Triton's CPU interpreter cannot loop over a runtime bound with NumPy >= 2.3.
@triton.autotune(configs=_CONFIGS, key=["N", "K", "PROLOGUE", "EPILOGUE", "HAS_BIAS"])
@triton.jit
def _fused_gemv_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, norm_w_ptr, gate_ptr, N, K: tl.constexpr, stride_wn, eps, cap,
                       PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr, PDL: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # The weights never depend on the kernel before, so the first tile's loads go out before the wait:
    # under dependent launch their memory latency overlaps the previous kernel's tail. Each later tile is
    # loaded one step ahead in the loop below, so every tile is read once.
    tile = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + tile[None, :]
    first = row_ok[:, None] & (tile < K)[None, :]
    w = tl.load(w_ptrs, mask=first, other=0.0, eviction_policy="evict_first")
    wu = w
    if EPILOGUE == 2:  # the SwiGLU "up" rows sit N rows below the gate rows of the fused matrix
        wu = tl.load(w_ptrs + N * stride_wn, mask=first, other=0.0, eviction_policy="evict_first")
    _wait_for_prior(PDL)
    if PROLOGUE == 2:
        # Per-head mean and 1/std of the cell output, two-pass as in the eager layer norm. Every program
        # recomputes them (the vector is a few KB, read from cache) instead of paying another launch.
        hidx = tl.arange(0, HEADS_P2)
        didx = tl.arange(0, HEAD_DIM_P2)
        hok = (hidx[:, None] * HEAD_DIM < K) & (didx[None, :] < HEAD_DIM)
        hv = tl.load(x_ptr + hidx[:, None] * HEAD_DIM + didx[None, :], mask=hok, other=0.0).to(tl.float32)
        mean = tl.sum(hv, axis=1) / HEAD_DIM
        centred = tl.where(hok, hv - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / HEAD_DIM + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if PROLOGUE == 1:  # RMS norm: the 1/rms factor is a scalar, applied after the reduction
            sumsq += x * x
            x = x * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if PROLOGUE == 2:  # layer norm per head, norm weight, then the output gate
            pick = (cols // HEAD_DIM)[:, None] == hidx[None, :]
            mu = tl.sum(tl.where(pick, mean[None, :], 0.0), axis=1)
            rs = tl.sum(tl.where(pick, rstd[None, :], 0.0), axis=1)
            gate = tl.load(gate_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            nw = tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = tl.where(col_ok, tl.sigmoid(gate) * ((x - mu) * rs * nw), 0.0)
        next_mask = row_ok[:, None] & (cols + BLOCK_K < K)[None, :]
        w_next = tl.load(w_ptrs + (k0 + BLOCK_K), mask=next_mask, other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
        if EPILOGUE == 2:
            wu_next = tl.load(w_ptrs + N * stride_wn + (k0 + BLOCK_K), mask=next_mask, other=0.0,
                              eviction_policy="evict_first")
            acc_up += wu.to(tl.float32) * x[None, :]
            wu = wu_next
    y = tl.sum(acc, axis=1)
    up = tl.sum(acc_up, axis=1)
    if PROLOGUE == 1:
        inv_rms = 1.0 / tl.sqrt(tl.sum(sumsq, axis=0) / K + eps)
        y = y * inv_rms
        up = up * inv_rms
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        if EPILOGUE == 2:
            up += tl.load(bias_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)
    if EPILOGUE == 1:
        y += tl.load(res_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if EPILOGUE == 2:
        y = y * tl.sigmoid(y) * up
    if EPILOGUE == 3:
        y = cap * _tanh(y / cap)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _rows_dot(x, w, IEEE: tl.constexpr, HALF_MMA: tl.constexpr):
    """x [BB, BK] float32 times w [BK, BN] (weight dtype), accumulated in float32.

    float32 weights: full-precision products (not TF32). Half weights: the rows are rounded to the weight
    dtype first, as the plain step's linear does; the products of two half values are exact in float32,
    so the half MMA (GPU) and the float32 products of the same values (the CPU interpreter, whose half
    dot is not usable) give the same sums up to the order of accumulation.
    """
    if IEEE:
        out = tl.dot(x, w, input_precision="ieee")
    elif HALF_MMA:
        out = tl.dot(x.to(w.dtype), w)
    else:
        out = tl.dot(x.to(w.dtype).to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return out


@triton.autotune(configs=_ROWS_CONFIGS, key=["B", "N", "K", "PROLOGUE", "EPILOGUE", "HAS_BIAS"])
@triton.jit
def _fused_rows_kernel(x_ptr, w_ptr, y_ptr, bias_ptr, res_ptr, norm_w_ptr, B, N, K: tl.constexpr,
                       stride_x, stride_y, stride_res, stride_wn, eps, cap,
                       PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       HALF_MMA: tl.constexpr, PDL: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[b] = epilogue(W @ prologue(X[b])) for the rows b of one group of BLOCK_B: W's tile is loaded once
    per k step and multiplied with every row of the group (tl.dot of [BLOCK_B, BLOCK_K] x [BLOCK_K, BLOCK_N])."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    _wait_for_prior(PDL)
    bs = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = bs < B
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        x = tl.load(x_ptr + bs[:, None] * stride_x + cols[None, :], mask=b_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if PROLOGUE == 1:  # RMS norm: the per-row 1/rms factor is applied after the reduction
            sumsq += tl.sum(x * x, axis=1)
            x = x * tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        w_mask = col_ok[:, None] & row_ok[None, :]
        w = tl.load(w_ptr + rows[None, :] * stride_wn + cols[:, None], mask=w_mask, other=0.0,
                    eviction_policy="evict_first")  # [BLOCK_K, BLOCK_N]: W^T's tile
        acc += _rows_dot(x, w, IEEE, HALF_MMA)
        if EPILOGUE == 2:  # the SwiGLU "up" rows sit N rows below the gate rows of the fused matrix
            wu = tl.load(w_ptr + (rows[None, :] + N) * stride_wn + cols[:, None], mask=w_mask, other=0.0,
                         eviction_policy="evict_first")
            acc_up += _rows_dot(x, wu, IEEE, HALF_MMA)
    if PROLOGUE == 1:
        inv_rms = 1.0 / tl.sqrt(sumsq / K + eps)
        acc = acc * inv_rms[:, None]
        acc_up = acc_up * inv_rms[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if EPILOGUE == 2:
            acc_up += tl.load(bias_ptr + N + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    y_mask = b_ok[:, None] & row_ok[None, :]
    if EPILOGUE == 1:
        acc += tl.load(res_ptr + bs[:, None] * stride_res + rows[None, :], mask=y_mask, other=0.0).to(tl.float32)
    if EPILOGUE == 2:
        acc = acc * tl.sigmoid(acc) * acc_up
    if EPILOGUE == 3:
        acc = cap * _tanh(acc / cap)
    tl.store(y_ptr + bs[:, None] * stride_y + rows[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _head_norm_gate_kernel(h_ptr, gate_ptr, norm_w_ptr, out_ptr, stride_h, stride_gate, stride_out, eps,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, PDL: tl.constexpr):
    """out[b, head] = sigmoid(gate) * layer_norm(h[b, head]) * norm_weight: the head-norm prologue of B > 1."""
    _wait_for_prior(PDL)
    b = tl.program_id(0)
    cols = tl.program_id(1) * HEAD_DIM + tl.arange(0, HEAD_DIM_P2)
    ok = tl.arange(0, HEAD_DIM_P2) < HEAD_DIM
    hv = tl.load(h_ptr + b * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(hv, axis=0) / HEAD_DIM
    centred = tl.where(ok, hv - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / HEAD_DIM + eps)
    gate = tl.load(gate_ptr + b * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    nw = tl.load(norm_w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_out + cols, tl.sigmoid(gate) * (centred * rstd * nw), mask=ok)


def _row_major(t: Tensor) -> bool:
    return t.ndim == 2 and t.stride(1) == 1


def _fused_rows(x: Tensor, weight: Tensor, out: Tensor, N: int, bias: Tensor | None, residual: Tensor | None,
                rms_weight: Tensor | None, head_norm: tuple[Tensor, Tensor, int] | None, swiglu: bool,
                soft_cap: float | None, eps: float) -> Tensor:
    """fused_gemv for x [B, K], B > 1 (rows may be strided; each row's elements contiguous)."""
    B, K = x.shape
    if not (_row_major(x) and _row_major(out) and out.shape == (B, N)) or (residual is not None and not (
            _row_major(residual) and residual.shape == (B, N))):
        raise ValueError("fused_gemv with rows needs x [B, K], out and residual [B, N], each row contiguous")
    prologue, epilogue, norm_w = PRO_NONE, EPI_NONE, x
    if rms_weight is not None:
        prologue, norm_w = PRO_RMS, rms_weight
    if head_norm is not None:  # one small launch normalises every (row, head), then a plain product
        nw, gate, head_dim = head_norm
        if not _row_major(gate) or gate.shape != (B, K):
            raise ValueError("fused_gemv head_norm with rows needs a gate [B, K], each row contiguous")
        normed = torch.empty(B, K, dtype=torch.float32, device=x.device)
        pdl = _pdl(x)
        _head_norm_gate_kernel[(B, K // head_dim)](x, gate, nw, normed, x.stride(0), gate.stride(0), normed.stride(0),
                                                   float(eps), HEAD_DIM=head_dim,
                                                   HEAD_DIM_P2=triton.next_power_of_2(head_dim), PDL=pdl, launch_pdl=pdl)
        x = normed
    if residual is not None:
        epilogue = EPI_RESIDUAL
    elif swiglu:
        epilogue = EPI_SWIGLU
    elif soft_cap is not None:
        epilogue = EPI_SOFT_CAP
    res = residual if residual is not None else out
    pdl = _pdl(x)
    _fused_rows_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(B, ROWS_PER_PROGRAM))](
        x, weight, out, bias if bias is not None else x, res, norm_w, B, N, K,
        x.stride(0), out.stride(0), res.stride(0), weight.stride(0), float(eps), float(soft_cap or 1.0),
        PROLOGUE=prologue, EPILOGUE=epilogue, HAS_BIAS=bias is not None, IEEE=weight.dtype == torch.float32,
        HALF_MMA=not _INTERPRETED, PDL=pdl, BLOCK_B=ROWS_PER_PROGRAM, launch_pdl=pdl,
    )
    return out


def fused_gemv(x: Tensor, weight: Tensor, out: Tensor, *, bias: Tensor | None = None, residual: Tensor | None = None,
               rms_weight: Tensor | None = None, head_norm: tuple[Tensor, Tensor, int] | None = None,
               swiglu: bool = False, soft_cap: float | None = None, eps: float = 1e-6) -> Tensor:
    """out = epilogue(weight @ prologue(x) + bias) for one row x [K] (out [N]) or for every row of x [B, K]
    (out [B, N]); weight [N, K] (or [2N, K] for swiglu).

    rms_weight: x -> x / rms(x) * rms_weight.  head_norm = (norm_weight, gate, head_dim):
    x -> sigmoid(gate) * layer_norm_per_head(x) * norm_weight (gate shaped like x).  residual: + residual
    (shaped like out).  swiglu: rows [0, N) are the gate and [N, 2N) the up projection, out = silu(gate) * up.
    soft_cap: cap * tanh(y/cap).  Rows (B > 1) read each weight tile once for all of them.
    """
    if (residual is not None) + swiglu + (soft_cap is not None) > 1:
        raise ValueError("fused_gemv takes one epilogue")
    if rms_weight is not None and head_norm is not None:
        raise ValueError("fused_gemv takes one prologue")
    K = x.shape[-1]
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if weight.stride(1) != 1:
        raise ValueError("fused_gemv needs a row-major weight")
    if x.ndim == 2 and x.shape[0] > 1:
        return _fused_rows(x, weight, out, N, bias, residual, rms_weight, head_norm, swiglu, soft_cap, eps)
    if weight.stride(1) != 1 or out.numel() != N or not x.is_contiguous() or not out.is_contiguous():
        raise ValueError("fused_gemv needs a row-major weight, a contiguous x and an out of N elements")
    prologue, epilogue = PRO_NONE, EPI_NONE
    norm_w, gate, head_dim = x, x, 1  # placeholders where unused (never read)
    if rms_weight is not None:
        prologue, norm_w = PRO_RMS, rms_weight
    if head_norm is not None:
        prologue, (norm_w, gate, head_dim) = PRO_HEAD_NORM, head_norm
    if residual is not None:
        epilogue = EPI_RESIDUAL
    elif swiglu:
        epilogue = EPI_SWIGLU
    elif soft_cap is not None:
        epilogue = EPI_SOFT_CAP
    heads = K // head_dim
    pdl = _pdl(x)
    args = (x, weight, out, bias if bias is not None else x, residual if residual is not None else x, norm_w, gate,
            N, K, weight.stride(0), float(eps), float(soft_cap or 1.0))
    meta = dict(PROLOGUE=prologue, EPILOGUE=epilogue, HAS_BIAS=bias is not None, HEAD_DIM=head_dim,
                HEADS_P2=triton.next_power_of_2(heads), HEAD_DIM_P2=triton.next_power_of_2(head_dim), PDL=pdl,
                launch_pdl=pdl)
    key = (N, K, prologue, epilogue)
    tile = pinned_tile(x, key)
    if tile is None:
        _fused_gemv_kernel[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
    else:  # the kernel under the autotuner, with the fixed tile
        block_n, block_k, warps, stages = tile
        _fused_gemv_kernel.fn[(triton.cdiv(N, block_n),)](*args, **meta, BLOCK_N=block_n, BLOCK_K=block_k,
                                                          num_warps=warps, num_stages=stages)
        pinned_launches[key] += 1
    return out


ARGMAX_BLOCK = 2048  # logits one program of the argmax scans


@triton.jit
def _argmax_kernel(x_ptr, best_ptr, at_ptr, sync_ptr, out_ptr, V, stride_x, P: tl.constexpr, P_P2: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[row] = the first index of the row's largest value, in one launch: each program writes the
    maximum of its BLOCK values and where it lies, and the row's last program to arrive (the cell's
    acquire-release counter, reset by that program) picks the first of the largest."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    _wait_for_prior(PDL)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < V, other=-float("inf"))
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_ptr + row * P + chunk, best)
    tl.store(at_ptr + row * P + chunk, at + chunk * BLOCK)
    arrived = tl.atomic_add(sync_ptr + row, 1, sem="acq_rel")  # after this program's partial is written
    if arrived == P - 1:
        p = tl.arange(0, P_P2)
        bests = tl.load(best_ptr + row * P + p, mask=p < P, other=-float("inf"), cache_modifier=".cg")
        _, first = tl.max(bests, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.load(at_ptr + row * P + first, cache_modifier=".cg").to(tl.int64))
        tl.store(sync_ptr + row, 0)


@dataclass
class ArgmaxBuffers:
    """What `argmax_rows` needs for B rows of V values: per-program partial maxima and a counter per row
    (zero between calls)."""

    best: Tensor
    at: Tensor
    sync: Tensor


def argmax_buffers(batch: int, vocab: int, device: torch.device | str) -> ArgmaxBuffers:
    programs = triton.cdiv(vocab, ARGMAX_BLOCK)
    return ArgmaxBuffers(best=torch.empty(batch, programs, dtype=torch.float32, device=device),
                         at=torch.empty(batch, programs, dtype=torch.int32, device=device),
                         sync=torch.zeros(batch, dtype=torch.int32, device=device))


def argmax_rows(x: Tensor, out: Tensor, buffers: ArgmaxBuffers) -> Tensor:
    """out [B, 1] (int64) = the first index of the largest value of each row of x [B, V] (float32, rows
    contiguous), as torch.argmax picks for rows without NaN; one launch, spread over the row so it costs
    a few microseconds where a one-block reduction costs more than ten."""
    batch, vocab = x.shape
    programs = triton.cdiv(vocab, ARGMAX_BLOCK)
    if x.dtype != torch.float32 or x.stride(1) != 1 or out.shape != (batch, 1) or out.dtype != torch.int64:
        raise ValueError("argmax_rows needs float32 rows x [B, V] and an int64 out [B, 1]")
    if buffers.best.shape != (batch, programs) or buffers.sync.numel() != batch:
        raise ValueError("argmax_rows needs buffers = argmax_buffers(B, V)")
    pdl = _pdl(x)
    _argmax_kernel[(programs, batch)](x, buffers.best, buffers.at, buffers.sync, out, vocab, x.stride(0), P=programs,
                                      P_P2=triton.next_power_of_2(programs), BLOCK=ARGMAX_BLOCK, PDL=pdl,
                                      launch_pdl=pdl)
    return out


@triton.jit
def _mlstm_cell_kernel(proj_ptr, c_ptr, n_ptr, m_ptr, sync_ptr, h_ptr, q_off, k_off, v_off, i_off, f_off, cap, scale, eps,
                       stride_proj, H: tl.constexpr, QK: tl.constexpr, QK_P2: tl.constexpr, V: tl.constexpr,
                       BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr, HAS_CAP: tl.constexpr, PDL: tl.constexpr):
    """One (head, value tile, row): the gates, C's tile in place and h's tile = q^T C / denominator.

    Every program of a head recomputes the head's gates, n and denominator (a few hundred floats, from
    cache) instead of a separate gate kernel handing them over: one launch per block fewer. n and m are
    rewritten in place, so only the head's last program to arrive writes them, after every other program
    of the head has read the old values (an acquire-release counter per row and head, reset to 0 by that
    last program for the next step).
    """
    hd = tl.program_id(0)  # head within the row: indexes the row's projection
    row = tl.program_id(2)  # batch row
    rh = row * H + hd  # (row, head): indexes C, n, m, the counters and h
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vcols < V
    d = tl.arange(0, QK_P2)
    ok = d < QK
    # The state was last written by this block's cell one step ago, long finished; only the projection
    # comes from the kernel before. So m, n and C's first tile are loaded before the wait, their memory
    # latency overlapping the kernel before (later tiles are loaded one loop step ahead).
    m_old = tl.load(m_ptr + rh)
    n_old = tl.load(n_ptr + rh * QK + d, mask=ok, other=0.0)
    tile = tl.arange(0, BLOCK_QK)
    c_ptrs = c_ptr + rh * QK * V + tile[:, None] * V + vcols[None, :]
    c_old = tl.load(c_ptrs, mask=(tile < QK)[:, None] & v_ok[None, :], other=0.0)
    _wait_for_prior(PDL)
    proj_ptr += row * stride_proj
    q_all = tl.load(proj_ptr + q_off + hd * QK + d, mask=ok, other=0.0).to(tl.float32) * scale
    k_all = tl.load(proj_ptr + k_off + hd * QK + d, mask=ok, other=0.0).to(tl.float32)
    i = tl.load(proj_ptr + i_off + hd).to(tl.float32)
    f = tl.load(proj_ptr + f_off + hd).to(tl.float32)
    if HAS_CAP:
        i = cap * _tanh(i / cap)
        f = cap * _tanh(f / cap)
    log_f = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # logsigmoid
    m_new = tl.maximum(log_f + m_old, i)
    f_act = tl.exp(log_f + m_old - m_new)
    i_act = tl.exp(i - m_new)
    n = f_act * n_old + i_act * k_all
    denom = tl.maximum(tl.abs(tl.sum(q_all * n, axis=0)), tl.exp(-m_new)) + eps

    v = tl.load(proj_ptr + v_off + hd * V + vcols, mask=v_ok, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(0, QK, BLOCK_QK):
        kr = k0 + tile
        k_ok = kr < QK
        c_next = tl.load(c_ptrs + (k0 + BLOCK_QK) * V, mask=(kr + BLOCK_QK < QK)[:, None] & v_ok[None, :],
                         other=0.0)
        k = tl.load(proj_ptr + k_off + hd * QK + kr, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.load(proj_ptr + q_off + hd * QK + kr, mask=k_ok, other=0.0).to(tl.float32) * scale
        c = f_act * c_old + i_act * (k[:, None] * v[None, :])
        tl.store(c_ptrs + k0 * V, c, mask=k_ok[:, None] & v_ok[None, :])
        acc += tl.sum(q[:, None] * c, axis=0)
        c_old = c_next
    tl.store(h_ptr + rh * V + vcols, acc / denom, mask=v_ok)

    arrived = tl.atomic_add(sync_ptr + rh, 1, sem="acq_rel")  # after this program's reads of n and m
    if arrived == tl.num_programs(1) - 1:
        tl.store(n_ptr + rh * QK + d, n, mask=ok)
        tl.store(m_ptr + rh, m_new)
        tl.store(sync_ptr + rh, 0)


def cell_sync_buffer(batch: int, heads: int, device: torch.device | str) -> Tensor:
    """The per-(row, head) counters `mlstm_decode_cell` needs: zeros, and left at zero by every call."""
    return torch.zeros(batch * heads, dtype=torch.int32, device=device)


def mlstm_decode_cell(proj: Tensor, splits: tuple[int, ...], heads: int, state: tuple[Tensor, Tensor, Tensor],
                      sync: Tensor, h_out: Tensor, cap: float | None, eps: float) -> Tensor:
    """One mLSTM step for B rows from the fused projection `proj` = [q | k | v | o | i | f] (float32; [P]
    for batch 1 or [B, P], each row contiguous), in one launch.

    Updates the state (C [B,H,QK,V], n [B,H,QK], m [B,H,1], float32, contiguous) in place and writes
    the un-normalised cell output h ([H*V] or [B, H*V], contiguous) into `h_out`. `sync` is
    `cell_sync_buffer(B, heads)` (int32 zeros, one counter per row and head), reused across calls.
    """
    c, n, m = state
    if not (c.is_contiguous() and n.is_contiguous() and m.is_contiguous() and c.dtype == torch.float32):
        raise ValueError("mlstm_decode_cell needs contiguous float32 state")
    batch = c.shape[0]
    proj2 = proj.view(1, -1) if proj.ndim == 1 else proj
    if proj2.shape[0] != batch or proj2.stride(-1) != 1 or not h_out.is_contiguous():
        raise ValueError("mlstm_decode_cell needs one projection row per state row and a contiguous h_out")
    if sync.dtype != torch.int32 or sync.numel() != batch * heads:
        raise ValueError("mlstm_decode_cell needs sync = cell_sync_buffer(rows, heads)")
    qk_total, _, v_total = splits[0], splits[1], splits[2]
    qk, v = qk_total // heads, v_total // heads
    q_off, k_off, v_off = 0, qk_total, 2 * qk_total
    i_off = 2 * qk_total + 2 * v_total
    f_off = i_off + heads
    # About 128 programs over the state: enough to spread its read and write over the chip.
    block_v = max(16, min(64, triton.next_power_of_2(max(1, batch * heads * v // 128))))
    block_v = min(block_v, triton.next_power_of_2(v))
    pdl = _pdl(proj)
    _mlstm_cell_kernel[(heads, triton.cdiv(v, block_v), batch)](
        proj2, c, n, m, sync, h_out, q_off, k_off, v_off, i_off, f_off, float(cap or 1.0), qk ** -0.5, eps,
        proj2.stride(0), H=heads, QK=qk, QK_P2=triton.next_power_of_2(qk), V=v,
        BLOCK_QK=min(max(64, 4096 // block_v), triton.next_power_of_2(qk)), BLOCK_V=block_v,  # C tiles up to 4096
        HAS_CAP=cap is not None, PDL=pdl,
        launch_pdl=pdl)
    return h_out
