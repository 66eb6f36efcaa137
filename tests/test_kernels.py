"""mLSTM and sLSTM kernels against the float64 quadratic reference and each other."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from xlstm_tune.kernels.mlstm import mlstm_chunkwise, mlstm_sequence, mlstm_step_block, zero_state
from xlstm_tune.kernels.reference import mlstm_quadratic_fp64, readout_condition
from xlstm_tune.kernels.slstm import slstm_sequence, slstm_step, slstm_zero_state

TOL = 1e-4  # docs/DESIGN.md §3: float32 paths match within 1e-4 relative


def _inputs(B, H, S, K, V, with_state=True):
    q, k = torch.randn(B, H, S, K), torch.randn(B, H, S, K)
    v = torch.randn(B, H, S, V)
    i = torch.randn(B, H, S) * 3  # wide gate range exercises the stabiliser
    f = torch.randn(B, H, S) * 3 + 2
    state = (torch.randn(B, H, K, V), torch.randn(B, H, K), torch.randn(B, H, 1)) if with_state else None
    return q, k, v, i, f, state


@pytest.mark.parametrize("S,chunk", [(1, 16), (7, 16), (16, 16), (37, 16), (64, 8), (50, 1), (33, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunkwise_matches_fp64_reference(seed, S, chunk, with_state):
    q, k, v, i, f, state = _inputs(2, 3, S, 8, 12, with_state)
    ref_h, ref_state = mlstm_quadratic_fp64(q, k, v, i, f, state)
    h, new_state = mlstm_chunkwise(q, k, v, i, f, state, chunk_size=chunk)
    assert h.dtype == torch.float32 and all(s.dtype == torch.float32 for s in new_state)
    # Where q.n nearly cancels, the read-out amplifies float32 rounding by its condition number (up to a
    # few hundred for these inputs): the bound grows with it there, 3e-6 per unit (observed at most 1.6e-6).
    cond = float(readout_condition(q, k, i, f, state).max())
    assert rel_err(h, ref_h) < max(TOL, 3e-6 * cond), f"seed={seed} condition={cond:.0f}"
    for got, want in zip(new_state, ref_state):
        assert rel_err(got, want) < TOL, f"seed={seed}"


@pytest.mark.parametrize("S", [1, 5, 29])
def test_step_sequence_matches_fp64_reference(seed, S):
    q, k, v, i, f, state = _inputs(2, 2, S, 16, 8)
    ref_h, ref_state = mlstm_quadratic_fp64(q, k, v, i, f, state)
    h, new_state = mlstm_sequence(q, k, v, i, f, state)
    assert rel_err(h, ref_h) < TOL, f"seed={seed}"
    for got, want in zip(new_state, ref_state):
        assert rel_err(got, want) < TOL, f"seed={seed}"


def test_step_block_equals_sequence_and_splits_carry_state(seed):
    q, k, v, i, f, _ = _inputs(1, 2, 12, 8, 8)
    full_h, full_state = mlstm_sequence(q, k, v, i, f)
    state = zero_state(1, 2, 8, 8, "cpu")
    hs = []
    for t0 in range(0, 12, 4):  # three blocks of t_inner=4
        h, state = mlstm_step_block(q[:, :, t0:t0 + 4], k[:, :, t0:t0 + 4], v[:, :, t0:t0 + 4], i[:, :, t0:t0 + 4], f[:, :, t0:t0 + 4], state)
        hs.append(h)
    assert rel_err(torch.cat(hs, 2), full_h) < 1e-6, f"seed={seed}"
    assert rel_err(state[0], full_state[0]) < 1e-6


def test_bf16_inputs_keep_float32_state(seed):
    q, k, v, i, f, _ = _inputs(1, 2, 40, 64, 64, with_state=False)
    # Positive q and k keep the normaliser q.n away from cancellation (with random signs it can nearly
    # cancel at 64 dims and amplify float32 rounding in any implementation), so float32 work stays ~1e-6
    # from float64 while any bf16 rounding inside the kernel would show as ~1e-3.
    low = [x.bfloat16() for x in (q.abs(), k.abs(), v, i, f)]
    h, state = mlstm_chunkwise(*low, chunk_size=16)
    assert all(s.dtype == torch.float32 for s in state) and h.dtype == torch.float32
    ref_h, _ = mlstm_quadratic_fp64(*low)
    assert rel_err(h, ref_h) < TOL, f"seed={seed}"


def _slstm_fp64_loop(wx, r, b):
    """Independent float64 re-statement of the sLSTM recurrence (global first-step test, as the reference)."""
    wx, r, b = wx.double(), r.double(), b.double()
    B, S, _, H, D = wx.shape
    y = c = n = m = torch.zeros(B, H, D, dtype=torch.float64)
    ys = []
    for t in range(S):
        raw = wx[:, t] + torch.einsum("bhi,higo->bgho", y, r) + b.transpose(0, 1)[None]
        ir, fr, zr, orr = raw.unbind(1)
        lfm = m + torch.nn.functional.logsigmoid(fr)
        mn = ir if t == 0 else torch.maximum(ir, lfm)
        ia, fa = torch.exp(ir - mn).clamp(max=1), torch.exp(lfm - mn).clamp(max=1)
        c, n = fa * c + ia * torch.tanh(zr), fa * n + ia
        y, m = torch.sigmoid(orr) * c / n, mn
        ys.append(y)
    return torch.stack(ys, 1)


def test_slstm_sequence_matches_fp64_loop(seed):
    B, S, H, D = 2, 23, 3, 5
    wx = torch.randn(B, S, 4, H, D) * 2
    r = torch.randn(H, D, 4, D) * 0.5
    b = torch.randn(H, 4, D)
    y, state = slstm_sequence(wx, r, b)
    assert rel_err(y, _slstm_fp64_loop(wx, r, b)) < TOL, f"seed={seed}"
    # state carried: the first 10 steps then the rest equals one pass
    y1, s1 = slstm_sequence(wx[:, :10], r, b)
    y2, _ = slstm_sequence(wx[:, 10:], r, b, s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-6
    y_step, _ = slstm_step(wx[:, 0], r, b, slstm_zero_state(B, H, D, "cpu"))
    assert rel_err(y_step, y[:, 0]) < 1e-6
