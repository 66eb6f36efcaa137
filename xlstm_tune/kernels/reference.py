"""Float64 quadratic references, used only by tests: independent of the step and chunkwise code paths."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_tune.kernels.mlstm import EPS


def mlstm_quadratic_fp64(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,
    state: tuple[Tensor, Tensor, Tensor] | None = None, eps: float = EPS,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The whole sequence as one masked decay-weighted attention, in float64.

    D[t, s] = F_t - F_s + i_s (F = cumulative log forget), the incoming state weighted by F_t + m0, and
    m_t the max of all those log weights: the closed form of the max-state recurrence.
    """
    q, k, v, i, f = (x.double() for x in (q, k, v, i, f))
    B, H, S, K = q.shape
    V = v.shape[-1]
    if state is None:
        c0 = q.new_zeros(B, H, K, V)
        n0 = q.new_zeros(B, H, K)
        m0 = q.new_zeros(B, H, 1)
    else:
        c0, n0, m0 = (x.double() for x in state)
    log_f = F.logsigmoid(f)
    cum = torch.cumsum(log_f, -1)  # F_t                                   [B,H,S]
    d = cum[..., :, None] - cum[..., None, :] + i[..., None, :]  # [B,H,S,S]
    d = d.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    log_init = cum + m0  # [B,H,S]
    m = torch.maximum(log_init, d.amax(-1))
    qs = q * K ** -0.5
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
