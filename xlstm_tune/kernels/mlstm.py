"""mLSTM cell math: recurrent step, T_inner step-block, sequence loop, chunkwise-parallel form.

Shapes (B batch, H heads, S time, K q/k head dim, V value head dim):
    q, k: [B, H, S, K]   v: [B, H, S, V]   i, f (gate pre-activations): [B, H, S]
    state: C [B, H, K, V], n [B, H, K], m [B, H, 1] -- always float32, whatever the input dtype.

The recurrence (xLSTM-7B, max-state stabiliser)::

    m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)
    C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n_t likewise with k_t)
    h_t = (q_t/sqrt(K))^T C_t / (max(|(q_t/sqrt(K))^T n_t|, exp(-m_t)) + eps)

The chunkwise form computes exactly the same m_t (the running max is a max over the same terms), so
it matches the step recurrence up to float rounding, not only up to the stabiliser's choice.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

State = tuple[Tensor, Tensor, Tensor]
EPS = 1e-6
STATE_DTYPE = torch.float32


def zero_state(batch: int, heads: int, k_dim: int, v_dim: int, device: torch.device | str) -> State:
    """The initial state: C = 0, n = 0, m = 0 (m starts at 0, not -inf, as in the public model)."""
    return (
        torch.zeros(batch, heads, k_dim, v_dim, dtype=STATE_DTYPE, device=device),
        torch.zeros(batch, heads, k_dim, dtype=STATE_DTYPE, device=device),
        torch.zeros(batch, heads, 1, dtype=STATE_DTYPE, device=device),
    )


def mlstm_step(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State, eps: float = EPS) -> tuple[Tensor, State]:
    """One timestep. q, k: [B, H, K]; v: [B, H, V]; i, f: [B, H, 1]. Returns h [B, H, V] (float32)."""
    c_old, n_old, m_old = state
    q, k, v = q.float(), k.float(), v.float()
    log_f = F.logsigmoid(f.float())
    m_new = torch.maximum(log_f + m_old, i.float())
    f_act = torch.exp(log_f + m_old - m_new)
    i_act = torch.exp(i.float() - m_new)
    q = q * (q.shape[-1] ** -0.5)
    c_new = f_act[..., None] * c_old + i_act[..., None] * (k[..., :, None] * v[..., None, :])
    n_new = f_act * n_old + i_act * k
    h_num = (q[..., None, :] @ c_new).squeeze(-2)
    qn = (q * n_new).sum(-1, keepdim=True)
    h = h_num / (torch.maximum(qn.abs(), torch.exp(-m_new)) + eps)
    return h, (c_new, n_new, m_new)


def mlstm_step_block(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State, eps: float = EPS) -> tuple[Tensor, State]:
    """Advance `q.shape[2]` (= T_inner) steps in one call: the unit that gets compiled.

    q, k: [B, H, T, K]; v: [B, H, T, V]; i, f: [B, H, T]. The loop is unrolled by the compiler because T
    is static for a given block, which gives the fusion window the seed system's T_inner describes.
    """
    hs = []
    for t in range(q.shape[2]):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None], f[:, :, t, None], state, eps)
        hs.append(h)
    return torch.stack(hs, dim=2), state


def mlstm_sequence(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None, eps: float = EPS) -> tuple[Tensor, State]:
    """Step-by-step over the whole sequence: the canonical reference path (float32, eager)."""
    B, H, S, K = q.shape
    if state is None:
        state = zero_state(B, H, K, v.shape[-1], q.device)
    hs = []
    for t in range(S):
        h, state = mlstm_step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t, None], f[:, :, t, None], state, eps)
        hs.append(h)
    return torch.stack(hs, dim=2), state


def _chunk_states(k: Tensor, v: Tensor, i: Tensor, log_f_cum: Tensor, state: State) -> tuple[Tensor, Tensor, Tensor, State]:
    """States entering every chunk, computed in parallel over chunks.

    k: [B,H,N,L,K] v: [B,H,N,L,V] i, log_f_cum: [B,H,N,L]. Returns C_in [B,H,N,K,V], n_in [B,H,N,K],
    m_in [B,H,N,1] and the state after the last chunk.
    """
    c0, n0, m0 = state
    B, H, N, L, _ = k.shape
    g = log_f_cum[..., -1]  # total log forget per chunk            [B,H,N]
    a = g[..., None] - log_f_cum + i  # log weight of step s at chunk end  [B,H,N,L]
    a_max = a.amax(-1)  # [B,H,N]
    w = torch.exp(a - a_max[..., None])
    c_loc = (k * w[..., None]).transpose(-1, -2) @ v  # [B,H,N,K,V], scaled by exp(a_max)
    n_loc = (k * w[..., None]).sum(-2)  # [B,H,N,K]

    # Chunk j's contribution reaches the start of chunk c (> j) through the forgets of chunks j+1..c-1.
    g_cum = torch.cumsum(g, -1)  # G_c = sum_{j<=c} g_j
    g_excl = g_cum - g  # sum_{j<c} g_j
    # log weight of chunk j's local sum at the start of chunk c: G_excl[c] - G_cum[j] + a_max[j], j < c
    log_w = g_excl[..., :, None] - g_cum[..., None, :] + a_max[..., None, :]  # [B,H,c,j]
    mask = torch.ones(N, N, dtype=torch.bool, device=k.device).tril(-1)
    log_w = log_w.masked_fill(~mask, float("-inf"))
    log_init = g_excl + m0  # log weight of the incoming state at the start of chunk c   [B,H,N]
    m_in = torch.maximum(log_init, log_w.amax(-1))  # [B,H,N]
    w_chunks = torch.exp(log_w - m_in[..., None])  # [B,H,N,N]
    w_init = torch.exp(log_init - m_in)  # [B,H,N]
    c_in = (w_chunks @ c_loc.flatten(-2)).view(B, H, N, *c_loc.shape[-2:]) + w_init[..., None, None] * c0[:, :, None]
    n_in = w_chunks @ n_loc + w_init[..., None] * n0[:, :, None]

    # State after the last chunk: one more scan step.
    m_last = torch.maximum(g[..., -1:] + m_in[..., -1:], a_max[..., -1:])  # [B,H,1]
    s_prev = torch.exp(g[..., -1:] + m_in[..., -1:] - m_last)
    s_loc = torch.exp(a_max[..., -1:] - m_last)
    c_last = s_prev[..., None] * c_in[:, :, -1] + s_loc[..., None] * c_loc[:, :, -1]
    n_last = s_prev * n_in[:, :, -1] + s_loc * n_loc[:, :, -1]
    return c_in, n_in, m_in[..., None], (c_last, n_last, m_last)


def mlstm_chunkwise(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State | None = None,
    chunk_size: int = 64, eps: float = EPS,
) -> tuple[Tensor, State]:
    """Chunkwise-parallel mLSTM for any length: full chunks in one batched pass, the tail as one chunk.

    Within a chunk the outputs are a masked, decay-weighted attention; across chunks the incoming states
    are formed in parallel (`_chunk_states`). All arithmetic is float32. Returns h as float32.
    """
    B, H, S, K = q.shape
    V = v.shape[-1]
    if state is None:
        state = zero_state(B, H, K, V, q.device)
    full = (S // chunk_size) * chunk_size
    outs = []
    if full:
        h, state = _chunkwise_full(q[:, :, :full], k[:, :, :full], v[:, :, :full], i[:, :, :full], f[:, :, :full], state, chunk_size, eps)
        outs.append(h)
    if full < S:
        h, state = _chunkwise_full(q[:, :, full:], k[:, :, full:], v[:, :, full:], i[:, :, full:], f[:, :, full:], state, S - full, eps)
        outs.append(h)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), state


def _chunkwise_full(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State, L: int, eps: float) -> tuple[Tensor, State]:
    """Chunkwise pass over a length that is a multiple of L."""
    B, H, S, K = q.shape
    N = S // L
    q = (q.float() * (K ** -0.5)).view(B, H, N, L, K)
    k = k.float().view(B, H, N, L, K)
    v = v.float().view(B, H, N, L, -1)
    i = i.float().view(B, H, N, L)
    log_f_cum = torch.cumsum(F.logsigmoid(f.float()).view(B, H, N, L), -1)  # b_t within each chunk

    c_in, n_in, m_in, last = _chunk_states(k, v, i, log_f_cum, state)

    # Intra-chunk log weights D[t, s] = b_t - b_s + i_s for s <= t.
    d = log_f_cum[..., :, None] - log_f_cum[..., None, :] + i[..., None, :]  # [B,H,N,L,L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    d = d.masked_fill(~causal, float("-inf"))
    log_inter = log_f_cum + m_in  # weight of the incoming state at step t  [B,H,N,L]
    m = torch.maximum(log_inter, d.amax(-1))  # == the step recurrence's m_t
    scores = (q @ k.transpose(-1, -2)) * torch.exp(d - m[..., None])
    inter = torch.exp(log_inter - m)[..., None]
    h_num = scores @ v + inter * (q @ c_in)
    qn = scores.sum(-1, keepdim=True) + inter * (q @ n_in[..., None])
    h = h_num / (torch.maximum(qn.abs(), torch.exp(-m)[..., None]) + eps)
    return h.reshape(B, H, S, -1), last
