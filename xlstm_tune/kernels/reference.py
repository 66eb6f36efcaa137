"""Float64 quadratic references, used only by tests: independent of the step and chunkwise code paths."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_tune.kernels.mlstm import EPS


def _decay_weights(q: Tensor, k: Tensor, i: Tensor, f: Tensor, state: tuple[Tensor, Tensor, Tensor] | None):
    """In float64: the log decay weights D [B,H,S,S] (masked), the incoming state's log weight, the max
    state m, the scaled queries and keys."""
    q, k, i, f = (x.double() for x in (q, k, i, f))
    B, H, S, K = q.shape
    m0 = q.new_zeros(B, H, 1) if state is None else state[2].double()
    cum = torch.cumsum(F.logsigmoid(f), -1)  # F_t                         [B,H,S]
    d = cum[..., :, None] - cum[..., None, :] + i[..., None, :]  # [B,H,S,S]
    d = d.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    log_init = cum + m0  # [B,H,S]
    m = torch.maximum(log_init, d.amax(-1))
    return d, log_init, m, q * K ** -0.5, k


def _state_fp64(state: tuple[Tensor, Tensor, Tensor] | None, like: Tensor, v_dim: int) -> tuple[Tensor, Tensor]:
    """C0 and n0 in float64 (zeros without a state)."""
    B, H, _, K = like.shape
    if state is None:
        return like.new_zeros(B, H, K, v_dim, dtype=torch.float64), like.new_zeros(B, H, K, dtype=torch.float64)
    return state[0].double(), state[1].double()


def mlstm_quadratic_fp64(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,
    state: tuple[Tensor, Tensor, Tensor] | None = None, eps: float = EPS,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The whole sequence as one masked decay-weighted attention, in float64.

    D[t, s] = F_t - F_s + i_s (F = cumulative log forget), the incoming state weighted by F_t + m0, and
    m_t the max of all those log weights: the closed form of the max-state recurrence.
    """
    d, log_init, m, qs, k = _decay_weights(q, k, i, f, state)
    v = v.double()
    c0, n0 = _state_fp64(state, q, v.shape[-1])
    w = torch.exp(d - m[..., None]) * (qs @ k.transpose(-1, -2))
    w_init = torch.exp(log_init - m)[..., None]
    num = w @ v + w_init * (qs @ c0)
    qn = w.sum(-1, keepdim=True) + w_init * (qs @ n0[..., None])
    h = num / (torch.maximum(qn.abs(), torch.exp(-m)[..., None]) + eps)
    # final state
    m_last = m[..., -1:]
    a = torch.exp(d[..., -1, :] - m_last)  # [B,H,S]
    s0 = torch.exp(log_init[..., -1:] - m_last)
    c_last = s0[..., None] * c0 + (k * a[..., None]).transpose(-1, -2) @ v
    n_last = s0 * n0 + (k * a[..., None]).sum(-2)
    return h, (c_last, n_last, m_last)


def readout_condition(q: Tensor, k: Tensor, i: Tensor, f: Tensor,
                      state: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """[B,H,S]: how much the read-out's denominator max(|q.n|, exp(-m)) amplifies rounding, i.e. the sum
    of the absolute terms of q.n over the denominator. Where q.n nearly cancels, any float32 path's
    h carries a relative error about this many times its rounding error, whatever its order of sums."""
    d, log_init, m, qs, k = _decay_weights(q, k, i, f, state)
    _, n0 = _state_fp64(state, q, 1)
    terms = torch.exp(d - m[..., None]) * (qs @ k.transpose(-1, -2))
    init = torch.exp(log_init - m) * (qs @ n0[..., None])[..., 0]
    qn = terms.sum(-1) + init
    return (terms.abs().sum(-1) + init.abs()) / torch.maximum(qn.abs(), torch.exp(-m))
