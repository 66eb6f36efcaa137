"""The xLSTM-Large model in Hugging Face's `xLSTMForCausalLM` layout, with optional sLSTM blocks.

Parameter names match `xLSTMForCausalLM.state_dict()` so checkpoints load by name. Cells run through
the model's `CellRuntime` (prefill) or the plain step kernels (one-token decode); `model.runtime = ...`
swaps the runtime without touching the weights.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlstm_tune.kernels.mlstm import mlstm_step, zero_state
from xlstm_tune.kernels.slstm import slstm_step, slstm_zero_state
from xlstm_tune.model.config import ModelConfig
from xlstm_tune.runtime.cells import CellRuntime
from xlstm_tune.runtime.tiles import compiled

# Per block: mLSTM (C, n, m); sLSTM (conv_state, y, c, n, m). Recurrent parts float32.
BlockState = tuple[Tensor, ...]
ModelState = list[BlockState]


@torch.no_grad()
def _fuse_linears(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate Linear weights (and biases) into one tensor and re-point each Linear at its slice.

    The module tree and state_dict names stay the same (checkpoints load into the views), the fused
    matrix is the only storage, and one GEMM replaces several launches.
    """
    ref = linears[0].weight
    rows = [lin.out_features for lin in linears]
    weight = torch.empty(sum(rows), ref.shape[1], dtype=ref.dtype, device=ref.device)
    has_bias = any(lin.bias is not None for lin in linears)
    bias = torch.zeros(sum(rows), dtype=ref.dtype, device=ref.device) if has_bias else None
    start = 0
    for lin, n in zip(linears, rows):
        weight[start:start + n].copy_(lin.weight)
        lin.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if lin.bias is not None:
            bias[start:start + n].copy_(lin.bias)  # type: ignore[index]
            lin.bias = nn.Parameter(bias[start:start + n], requires_grad=False)  # type: ignore[index]
        start += n
    return weight, bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, matvec: Callable[..., Tensor] | None) -> Tensor:
    """F.linear, or the device's batch-1 matrix-vector kernel when the input is a single row (decode)."""
    if matvec is not None and x.numel() == x.shape[-1]:
        return matvec(x, weight, bias)
    return F.linear(x, weight, bias)


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


# ---- the block math as plain functions: shared by the modules, the decode step and the compiled prefill
def rms_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, force_float32: bool) -> Tensor:
    dtype = x.dtype
    y = x.float() if force_float32 else x
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(dtype) * weight
    return y if bias is None else y + bias


def head_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, force_float32: bool) -> Tensor:
    """Layer norm over each head's features; [B, S, H, D] -> [B, S, H*D]."""
    dtype = x.dtype
    y = x.float() if force_float32 else x
    y = (y - y.mean(-1, keepdim=True)) * torch.rsqrt(y.var(-1, keepdim=True, unbiased=False) + eps)
    y = y.to(dtype).flatten(-2) * weight
    return y if bias is None else y + bias


def swiglu(x: Tensor, up_w: Tensor, up_b: Tensor | None, down_w: Tensor, down_b: Tensor | None, ffn_dim: int,
           matvec: Callable[..., Tensor] | None) -> Tensor:
    gate, z = linear(x, up_w, up_b, matvec).split(ffn_dim, dim=-1)
    return linear(F.silu(gate) * z, down_w, down_b, matvec)


def mlstm_block_in(x: Tensor, norm: tuple, in_w: Tensor, in_b: Tensor | None, splits: tuple[int, ...], heads: int,
                   cap: float | None, matvec: Callable[..., Tensor] | None) -> tuple[Tensor, ...]:
    """Pre-norm and the fused projection: q, k, v [B,H,S,*], output gate o [B,S,V], gates i, f [B,H,S]."""
    B, S, _ = x.shape
    q, k, v, o, i, f = linear(rms_norm(x, *norm), in_w, in_b, matvec).split(list(splits), dim=-1)
    q = q.view(B, S, heads, -1).transpose(1, 2)
    k = k.view(B, S, heads, -1).transpose(1, 2)
    v = v.view(B, S, heads, -1).transpose(1, 2)
    return q, k, v, o, soft_cap(i, cap).transpose(1, 2), soft_cap(f, cap).transpose(1, 2)


def mlstm_block_out(x: Tensor, h: Tensor, o: Tensor, head_norm_args: tuple, out_w: Tensor, out_b: Tensor | None,
                    ffn_norm: tuple, up_w: Tensor, up_b: Tensor | None, down_w: Tensor, down_b: Tensor | None,
                    ffn_dim: int, matvec: Callable[..., Tensor] | None) -> Tensor:
    """Head norm, output gate, out projection and residual; then the pre-norm SwiGLU and residual."""
    hn = head_norm(h.to(x.dtype).transpose(1, 2), *head_norm_args)
    x = x + linear(torch.sigmoid(o) * hn, out_w, out_b, matvec)
    return x + swiglu(rms_norm(x, *ffn_norm), up_w, up_b, down_w, down_b, ffn_dim, matvec)


def lm_logits(x: Tensor, out_norm: tuple, head_w: Tensor, cap: float | None,
              matvec: Callable[..., Tensor] | None) -> Tensor:
    """Final norm, head product and soft cap: float32 logits [..., V]. Compiled for prefill, the logits'
    cast and cap become one pass over the S x V logits instead of four. Eagerly the cap works in place on
    the fresh logits (the same operations, bit for bit): each out-of-place pass would allocate another
    S x V float32 buffer, whose first touch costs a CPU more than the arithmetic."""
    x = rms_norm(x, *out_norm)
    logits = linear(x.to(head_w.dtype), head_w, None, matvec).float()
    return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, use_bias: bool = False, force_float32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if use_bias else None
        self.eps, self.force_float32 = eps, force_float32

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.bias, self.eps, self.force_float32)


class MultiHeadLayerNorm(nn.Module):
    """Layer norm over each head's features; input [B, S, H, D] -> [B, S, H*D]."""

    def __init__(self, heads: int, head_dim: int, eps: float, use_bias: bool = False, force_float32: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(heads * head_dim)) if use_bias else None
        self.eps, self.force_float32 = eps, force_float32

    def forward(self, x: Tensor) -> Tensor:
        return head_norm(x, self.weight, self.bias, self.eps, self.force_float32)


class FeedForward(nn.Module):
    """SwiGLU feed-forward."""

    matvec: Callable[..., Tensor] | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fused = cfg.weight_mode == "fused"
        d, f = cfg.hidden_size, cfg.ffn_dim
        if self.fused:
            self.proj_up_gate_z = nn.Linear(d, 2 * f, bias=cfg.use_bias)
        else:
            self.proj_up_gate = nn.Linear(d, f, bias=cfg.use_bias)
            self.proj_up = nn.Linear(d, f, bias=cfg.use_bias)
        self.proj_down = nn.Linear(f, d, bias=cfg.use_bias)
        self.ffn_dim = f
        self.up_weight: Tensor | None = None  # [2f, d] view-backed fusion of gate and up (see fuse)
        self.up_bias: Tensor | None = None

    def fuse(self) -> None:
        """One GEMM for gate and up: both weights become views into one [2f, d] matrix (no extra memory)."""
        if self.fused:
            self.up_weight, self.up_bias = self.proj_up_gate_z.weight, self.proj_up_gate_z.bias
            return
        self.up_weight, self.up_bias = _fuse_linears([self.proj_up_gate, self.proj_up])

    def forward(self, x: Tensor) -> Tensor:
        if self.up_weight is None:
            self.fuse()
        return swiglu(x, self.up_weight, self.up_bias, self.proj_down.weight, self.proj_down.bias, self.ffn_dim, self.matvec)


class MLSTMLayer(nn.Module):
    matvec: Callable[..., Tensor] | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, qk, v, h = cfg.hidden_size, cfg.qk_dim, cfg.v_dim, cfg.num_heads
        if cfg.weight_mode == "fused":
            self.qkv_opreact = nn.Linear(d, 2 * qk + 2 * v, bias=cfg.use_bias)
            self.ifgate_preact = nn.Linear(d, 2 * h, bias=True)
        else:
            self.q = nn.Linear(d, qk, bias=cfg.use_bias)
            self.k = nn.Linear(d, qk, bias=cfg.use_bias)
            self.v = nn.Linear(d, v, bias=cfg.use_bias)
            self.ogate_preact = nn.Linear(d, v, bias=cfg.use_bias)
            self.igate_preact = nn.Linear(d, h, bias=True)
            self.fgate_preact = nn.Linear(d, h, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(h, cfg.v_head_dim, cfg.norm_eps, cfg.use_bias, cfg.norm_reduction_force_float32)
        self.out_proj = nn.Linear(v, d, bias=cfg.use_bias)
        self.in_weight: Tensor | None = None  # q|k|v|o|i|f fused, view-backed (see fuse)
        self.in_bias: Tensor | None = None

    def fuse(self) -> None:
        """One GEMM for q, k, v, o and both gates: the separate weights become views into one matrix."""
        parts = [self.qkv_opreact, self.ifgate_preact] if self.cfg.weight_mode == "fused" else \
            [self.q, self.k, self.v, self.ogate_preact, self.igate_preact, self.fgate_preact]
        self.in_weight, self.in_bias = _fuse_linears(parts)

    @property
    def splits(self) -> tuple[int, ...]:
        cfg = self.cfg
        return (cfg.qk_dim, cfg.qk_dim, cfg.v_dim, cfg.v_dim, cfg.num_heads, cfg.num_heads)


class HeadwiseLinear(nn.Module):
    """Block-diagonal projection: each head maps its own slice (the sLSTM gate inputs)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.weight = nn.Parameter(torch.empty(heads, dim // heads, dim // heads))
        nn.init.normal_(self.weight, std=(2 / 5 / (dim // heads)) ** 0.5)

    def forward(self, x: Tensor) -> Tensor:  # [..., dim] -> [..., heads, head_dim]
        x = x.view(*x.shape[:-1], self.heads, -1)
        return torch.einsum("...hd,hod->...ho", x, self.weight)


class SLSTMLayer(nn.Module):
    """sLSTM layer as in the `xlstm` package: causal conv + SiLU feeding i/f, headwise gate projections,
    per-head recurrence, group norm with a residual weight (1 + w)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.hidden_size, cfg.slstm_num_heads
        self.heads, self.head_dim, self.ks = h, d // h, cfg.slstm_conv1d_kernel_size
        if self.ks > 0:
            self.conv1d_weight = nn.Parameter(torch.randn(d, self.ks) / self.ks)
            self.conv1d_bias = nn.Parameter(torch.zeros(d))
        self.igate = HeadwiseLinear(d, h)
        self.fgate = HeadwiseLinear(d, h)
        self.zgate = HeadwiseLinear(d, h)
        self.ogate = HeadwiseLinear(d, h)
        self.recurrent_kernel = nn.Parameter(torch.zeros(h, d // h, 4, d // h))
        self.bias = nn.Parameter(torch.zeros(h, 4, d // h))
        self.group_norm_weight = nn.Parameter(torch.zeros(d))
        self.eps = 1e-5

    def _conv(self, x: Tensor, conv_state: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv over [history (ks-1 steps); x]; returns SiLU(conv) and the new history."""
        if self.ks == 0:
            return x, conv_state
        full = torch.cat([conv_state.to(x.dtype), x], dim=1)  # [B, ks-1+S, D]
        windows = full.unfold(1, self.ks, 1)  # [B, S, D, ks]
        y = (windows * self.conv1d_weight).sum(-1) + self.conv1d_bias
        return F.silu(y), full[:, full.shape[1] - (self.ks - 1):].clone(memory_format=torch.contiguous_format)  # fresh standard strides: compiled decode never recompiles

    def forward(self, x: Tensor, state: BlockState, runtime: Optional[CellRuntime]) -> tuple[Tensor, BlockState]:
        B, S, D = x.shape
        conv_state, *cell_state = state
        x_conv, conv_state = self._conv(x, conv_state)
        wx = torch.stack([self.igate(x_conv), self.fgate(x_conv), self.zgate(x), self.ogate(x)], dim=2)  # [B,S,4,H,Dh]
        if runtime is None:
            y, new_cell = slstm_step(wx[:, 0], self.recurrent_kernel, self.bias, tuple(cell_state))  # type: ignore[arg-type]
            y = y[:, None]
        else:
            y, new_cell = runtime.slstm(wx, self.recurrent_kernel, self.bias, tuple(cell_state))  # type: ignore[arg-type]
        y = F.group_norm(y.reshape(B * S, D), self.heads, 1.0 + self.group_norm_weight.float(), None, self.eps)
        return y.view(B, S, D).to(x.dtype), (conv_state, *new_cell)


class Block(nn.Module):
    """Pre-norm residual block: cell layer then SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, slstm: bool):
        super().__init__()
        self.is_slstm = slstm
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.use_bias, cfg.norm_reduction_force_float32)  # noqa: E731
        if slstm:
            self.norm_slstm, self.slstm_layer = norm(), SLSTMLayer(cfg)
        else:
            self.norm_mlstm, self.mlstm_layer = norm(), MLSTMLayer(cfg)
        self.norm_ffn = norm()
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, state: BlockState, runtime: Optional[CellRuntime]) -> tuple[Tensor, BlockState]:
        if self.is_slstm:
            y, state = self.slstm_layer(self.norm_slstm(x), state, runtime)
            x = x + y
            return x + self.ffn(self.norm_ffn(x)), state
        return self._mlstm_forward(x, state, runtime)

    def _mlstm_forward(self, x: Tensor, state: BlockState, runtime: Optional[CellRuntime]) -> tuple[Tensor, BlockState]:
        layer, ffn = self.mlstm_layer, self.ffn
        if layer.in_weight is None or ffn.up_weight is None:
            layer.fuse()
            ffn.fuse()
        block_in, block_out = mlstm_block_in, mlstm_block_out
        if runtime is not None and runtime.tile.compile:
            # Prefill: the elementwise work around the GEMMs fuses into a few kernels. Plain functions of
            # tensors compile once and serve every layer (no per-module recompiles).
            block_in = compiled("mlstm_block_in", mlstm_block_in)
            block_out = compiled("mlstm_block_out", mlstm_block_out)
        norm = self.norm_mlstm
        q, k, v, o, i, f = block_in(x, (norm.weight, norm.bias, norm.eps, norm.force_float32), layer.in_weight, layer.in_bias,
                                    layer.splits, layer.cfg.num_heads, layer.cfg.gate_soft_cap, layer.matvec)
        if runtime is None:  # one-token decode: plain step over all heads
            h, state = mlstm_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i, f, state)  # type: ignore[arg-type]
            h = h[:, :, None]
        else:
            h, state = runtime.mlstm(q, k, v, i, f, state)  # type: ignore[arg-type]
        mh, fn = layer.multihead_norm, self.norm_ffn
        x = block_out(x, h, o, (mh.weight, mh.bias, mh.eps, mh.force_float32), layer.out_proj.weight, layer.out_proj.bias,
                      (fn.weight, fn.bias, fn.eps, fn.force_float32), ffn.up_weight, ffn.up_bias, ffn.proj_down.weight,
                      ffn.proj_down.bias, ffn.ffn_dim, layer.matvec)
        return x, state


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList([Block(cfg, cfg.is_slstm(n)) for n in range(cfg.num_hidden_layers)])
        self.out_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, False, cfg.norm_reduction_force_float32)


class XLSTMForCausalLM(nn.Module):
    """Logits are float32 and soft-capped, as in the reference."""

    matvec: Callable[..., Tensor] | None = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def set_matvec(self, fn: Callable[..., Tensor] | None) -> None:
        """Route single-row linears (batch-1 decode) through `fn`; None restores F.linear everywhere."""
        for module in self.modules():
            if isinstance(module, (MLSTMLayer, FeedForward, XLSTMForCausalLM)):
                module.matvec = fn

    def fuse_projections(self) -> None:
        """Fuse each mLSTM layer's input projections and each FFN's gate/up into single GEMMs."""
        for block in self.backbone.blocks:
            if not block.is_slstm:
                block.mlstm_layer.fuse()
            block.ffn.fuse()

    def init_state(self, batch: int, device: torch.device | None = None) -> ModelState:
        cfg = self.config
        device = device or self.lm_head.weight.device
        states: ModelState = []
        for block in self.backbone.blocks:
            if block.is_slstm:
                layer = block.slstm_layer
                conv = torch.zeros(batch, max(layer.ks - 1, 0), cfg.hidden_size, device=device, dtype=self.lm_head.weight.dtype)
                states.append((conv, *slstm_zero_state(batch, layer.heads, layer.head_dim, device)))
            else:
                states.append(zero_state(batch, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim, device))
        return states

    def forward_tokens(self, input_ids: Tensor, state: ModelState | None, runtime: Optional[CellRuntime]) -> tuple[Tensor, ModelState]:
        """input_ids [B, S] -> float32 logits [B, S, V]. runtime=None means the one-token step path."""
        if state is None:
            state = self.init_state(input_ids.shape[0], input_ids.device)
        x = self.backbone.embeddings(input_ids)
        new_state: ModelState = []
        for block, block_state in zip(self.backbone.blocks, state):
            x, block_state = block(x, block_state, runtime)
            new_state.append(block_state)
        head = compiled("lm_logits", lm_logits) if runtime is not None and runtime.tile.compile else lm_logits
        norm = self.backbone.out_norm
        logits = head(x, (norm.weight, norm.bias, norm.eps, norm.force_float32), self.lm_head.weight,
                      self.config.output_logit_soft_cap, self.matvec)
        return logits, new_state

    def decode_step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """One token [B, 1] through the plain step kernels (the function decode modes compile/capture)."""
        return self.forward_tokens(token, state, None)


def state_nbytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for bs in state for t in bs)
