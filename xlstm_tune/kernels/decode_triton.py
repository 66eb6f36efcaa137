"""Fused batch-1 decode kernels (Triton): six launches per mLSTM block instead of a dozen.

At batch 1 a decode step reads every weight once, so its floor is weight bytes / memory bandwidth;
what it costs beyond that is launches and the small elementwise kernels between the matrix-vector
products. These kernels fold that elementwise work into the products' prologues and epilogues:

    fused_gemv    y = W @ prologue(x) (+ bias), then an epilogue
                  prologue: none | RMS norm | per-head layer norm times sigmoid(output gate)
                  epilogue: none | + residual | SwiGLU pair silu(W_g x) * (W_u x) | soft cap
    mlstm_gates   per head: gate soft caps, max-state m, n, the read-out denominator (state in place)
    mlstm_state   per head and value tile: C in place and h = q^T C / denominator

All arithmetic is float32 whatever the weight dtype. Only imported where
`runtime.device.fused_decode_kernels` finds CUDA and Triton (or Triton's interpreter, for tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

PRO_NONE, PRO_RMS, PRO_HEAD_NORM = 0, 1, 2
EPI_NONE, EPI_RESIDUAL, EPI_SWIGLU, EPI_SOFT_CAP = 0, 1, 2, 3

# Few configurations: every (shape, prologue, epilogue) key is tuned once per process, before capture.
_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (8, 512, 8, 2), (16, 256, 8, 3),
                         (2, 1024, 4, 3), (4, 1024, 8, 2)]
]
if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter (tests) cannot time configurations
    _CONFIGS = _CONFIGS[2:3]


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
                       HEAD_DIM: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
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
        w_mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=w_mask, other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        if EPILOGUE == 2:  # the SwiGLU "up" rows sit N rows below the gate rows of the fused matrix
            wu = tl.load(w_ptr + (rows[:, None] + N) * stride_wn + cols[None, :], mask=w_mask, other=0.0,
                         eviction_policy="evict_first")
            acc_up += wu.to(tl.float32) * x[None, :]
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


def fused_gemv(x: Tensor, weight: Tensor, out: Tensor, *, bias: Tensor | None = None, residual: Tensor | None = None,
               rms_weight: Tensor | None = None, head_norm: tuple[Tensor, Tensor, int] | None = None,
               swiglu: bool = False, soft_cap: float | None = None, eps: float = 1e-6) -> Tensor:
    """out = epilogue(weight @ prologue(x) + bias) for one row x [K]; weight [N, K] (or [2N, K] for swiglu).

    rms_weight: x -> x / rms(x) * rms_weight.  head_norm = (norm_weight, gate, head_dim):
    x -> sigmoid(gate) * layer_norm_per_head(x) * norm_weight.  residual: + residual.  swiglu: rows
    [0, N) are the gate and [N, 2N) the up projection, out = silu(gate) * up.  soft_cap: cap * tanh(y/cap).
    """
    if (residual is not None) + swiglu + (soft_cap is not None) > 1:
        raise ValueError("fused_gemv takes one epilogue")
    if rms_weight is not None and head_norm is not None:
        raise ValueError("fused_gemv takes one prologue")
    K = x.shape[-1]
    N = weight.shape[0] // 2 if swiglu else weight.shape[0]
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
    _fused_gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        x, weight, out, bias if bias is not None else x, residual if residual is not None else x, norm_w, gate,
        N, K, weight.stride(0), float(eps), float(soft_cap or 1.0),
        PROLOGUE=prologue, EPILOGUE=epilogue, HAS_BIAS=bias is not None,
        HEAD_DIM=head_dim, HEADS_P2=triton.next_power_of_2(heads), HEAD_DIM_P2=triton.next_power_of_2(head_dim),
    )
    return out


@triton.jit
def _mlstm_gates_kernel(proj_ptr, n_ptr, m_ptr, scal_ptr, q_off, k_off, i_off, f_off, cap, scale, eps,
                        QK: tl.constexpr, QK_P2: tl.constexpr, HAS_CAP: tl.constexpr):
    head = tl.program_id(0)
    d = tl.arange(0, QK_P2)
    ok = d < QK
    q = tl.load(proj_ptr + q_off + head * QK + d, mask=ok, other=0.0).to(tl.float32) * scale
    k = tl.load(proj_ptr + k_off + head * QK + d, mask=ok, other=0.0).to(tl.float32)
    i = tl.load(proj_ptr + i_off + head).to(tl.float32)
    f = tl.load(proj_ptr + f_off + head).to(tl.float32)
    if HAS_CAP:
        i = cap * _tanh(i / cap)
        f = cap * _tanh(f / cap)
    log_f = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))  # logsigmoid
    m_old = tl.load(m_ptr + head)
    m_new = tl.maximum(log_f + m_old, i)
    f_act = tl.exp(log_f + m_old - m_new)
    i_act = tl.exp(i - m_new)
    n = f_act * tl.load(n_ptr + head * QK + d, mask=ok, other=0.0) + i_act * k
    tl.store(n_ptr + head * QK + d, n, mask=ok)
    tl.store(m_ptr + head, m_new)
    denom = tl.maximum(tl.abs(tl.sum(q * n, axis=0)), tl.exp(-m_new)) + eps
    tl.store(scal_ptr + head * 4 + 0, f_act)
    tl.store(scal_ptr + head * 4 + 1, i_act)
    tl.store(scal_ptr + head * 4 + 2, denom)


@triton.jit
def _mlstm_state_kernel(proj_ptr, c_ptr, scal_ptr, h_ptr, q_off, k_off, v_off, scale,
                        QK: tl.constexpr, V: tl.constexpr, BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr):
    head = tl.program_id(0)
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = vcols < V
    v = tl.load(proj_ptr + v_off + head * V + vcols, mask=v_ok, other=0.0).to(tl.float32)
    f_act = tl.load(scal_ptr + head * 4 + 0)
    i_act = tl.load(scal_ptr + head * 4 + 1)
    denom = tl.load(scal_ptr + head * 4 + 2)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for k0 in range(0, QK, BLOCK_QK):
        kr = k0 + tl.arange(0, BLOCK_QK)
        k_ok = kr < QK
        k = tl.load(proj_ptr + k_off + head * QK + kr, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.load(proj_ptr + q_off + head * QK + kr, mask=k_ok, other=0.0).to(tl.float32) * scale
        ptrs = c_ptr + head * QK * V + kr[:, None] * V + vcols[None, :]
        c_ok = k_ok[:, None] & v_ok[None, :]
        c = f_act * tl.load(ptrs, mask=c_ok, other=0.0) + i_act * (k[:, None] * v[None, :])
        tl.store(ptrs, c, mask=c_ok)
        acc += tl.sum(q[:, None] * c, axis=0)
    tl.store(h_ptr + head * V + vcols, acc / denom, mask=v_ok)


def mlstm_decode_cell(proj: Tensor, splits: tuple[int, ...], heads: int, state: tuple[Tensor, Tensor, Tensor],
                      scratch: Tensor, h_out: Tensor, cap: float | None, eps: float) -> Tensor:
    """One mLSTM step for batch 1 from the fused projection `proj` = [q | k | v | o | i | f] (float32).

    Updates the state (C [1,H,QK,V], n [1,H,QK], m [1,H,1], float32, contiguous) in place and writes
    the un-normalised cell output h [H*V] into `h_out`. `scratch` holds 4 floats per head.
    """
    c, n, m = state
    if not (c.is_contiguous() and n.is_contiguous() and m.is_contiguous() and c.dtype == torch.float32):
        raise ValueError("mlstm_decode_cell needs contiguous float32 state")
    qk_total, _, v_total = splits[0], splits[1], splits[2]
    qk, v = qk_total // heads, v_total // heads
    q_off, k_off, v_off = 0, qk_total, 2 * qk_total
    i_off = 2 * qk_total + 2 * v_total
    f_off = i_off + heads
    scale = qk ** -0.5
    _mlstm_gates_kernel[(heads,)](proj, n, m, scratch, q_off, k_off, i_off, f_off, float(cap or 1.0), scale, eps,
                                  QK=qk, QK_P2=triton.next_power_of_2(qk), HAS_CAP=cap is not None)
    # About 128 programs over the state: enough to spread its read and write over the chip.
    block_v = max(16, min(64, triton.next_power_of_2(max(1, heads * v // 128))))
    block_v = min(block_v, triton.next_power_of_2(v))
    _mlstm_state_kernel[(heads, triton.cdiv(v, block_v))](proj, c, scratch, h_out, q_off, k_off, v_off, scale,
                                                          QK=qk, V=v, BLOCK_QK=min(64, triton.next_power_of_2(qk)),
                                                          BLOCK_V=block_v)
    return h_out
