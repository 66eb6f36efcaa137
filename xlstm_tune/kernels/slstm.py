"""sLSTM cell math: per-head block-diagonal recurrence with exponential gating and a stabiliser.

Matches the `xlstm` package's sLSTM (vanilla backend). Shapes (B batch, H heads, D head dim):
    gate pre-activations from the input, wx: [B, S, 4, H, D] in gate order (i, f, z, o)
    recurrent kernel r: [H, D_in, 4, D_out]      bias b: [H, 4, D]
    state: (y, c, n, m), each [B, H, D], float32.

    raw = wx_t + r^T y_{t-1} + b
    m_t = i_raw if n_{t-1} == 0 (first step) else max(i_raw, logsigmoid(f_raw) + m_{t-1})
    i = min(exp(i_raw - m_t), 1);  f = min(exp(logsigmoid(f_raw) + m_{t-1} - m_t), 1)
    c_t = f c + i tanh(z_raw);  n_t = f n + i;  y_t = sigmoid(o_raw) c_t / n_t
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SState = tuple[Tensor, Tensor, Tensor, Tensor]


def slstm_zero_state(batch: int, heads: int, head_dim: int, device: torch.device | str) -> SState:
    z = torch.zeros(batch, heads, head_dim, dtype=torch.float32, device=device)
    return (z, z.clone(), z.clone(), z.clone())


def slstm_step(wx: Tensor, r: Tensor, b: Tensor, state: SState) -> tuple[Tensor, SState]:
    """One timestep. wx: [B, 4, H, D] (i, f, z, o); returns y [B, H, D] and the new state."""
    y, c, n, m = state
    ry = torch.einsum("bhi,higo->bgho", y, r.float())  # [B, 4, H, D]
    raw = wx.float() + ry + b.float().transpose(0, 1)[None]
    i_raw, f_raw, z_raw, o_raw = raw.unbind(1)
    log_f_plus_m = m + F.logsigmoid(f_raw)
    # Elementwise form of the reference's "first step" test (n is zero only before the first step).
    m_new = torch.where(n == 0, i_raw, torch.maximum(i_raw, log_f_plus_m))
    i_act = torch.clamp(torch.exp(i_raw - m_new), max=1.0)
    f_act = torch.clamp(torch.exp(log_f_plus_m - m_new), max=1.0)
    c_new = f_act * c + i_act * torch.tanh(z_raw)
    n_new = f_act * n + i_act
    y_new = torch.sigmoid(o_raw) * c_new / n_new
    return y_new, (y_new, c_new, n_new, m_new)


def slstm_step_block(wx: Tensor, r: Tensor, b: Tensor, state: SState) -> tuple[Tensor, SState]:
    """`wx.shape[1]` steps in one call (the compiled unit). wx: [B, T, 4, H, D]; returns [B, T, H, D]."""
    ys = []
    for t in range(wx.shape[1]):
        y, state = slstm_step(wx[:, t], r, b, state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def slstm_sequence(wx: Tensor, r: Tensor, b: Tensor, state: SState | None = None) -> tuple[Tensor, SState]:
    """Step by step over the sequence (there is no parallel form: the recurrence is nonlinear in y)."""
    B, S, _, H, D = wx.shape
    if state is None:
        state = slstm_zero_state(B, H, D, wx.device)
    return slstm_step_block(wx, r, b, state)
