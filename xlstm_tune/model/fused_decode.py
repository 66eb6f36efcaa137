"""Decode step of batch 1..16 on the fused decode kernels, updating the state in place (what `graph` captures).

Per mLSTM block: RMS norm + q|k|v|o|i|f product, gates + state update + read-out, head norm + output
gate + out projection + residual, RMS norm + SwiGLU product, down projection + residual -- five
launches. sLSTM blocks run their plain step. Intermediates live in buffers owned by the step, so a
captured graph replays with no allocation; the residual stream alternates between two buffers so no
kernel reads what it writes. Each batch size has its own buffers (made on its first step).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from xlstm_tune.kernels.mlstm import EPS
from xlstm_tune.model.xlstm import ModelState, XLSTMForCausalLM


def fused_decode_supported(net: XLSTMForCausalLM) -> str | None:
    """None if `net` can use the fused step, else why not (the caller then captures the generic step)."""
    if net.config.use_bias:
        return "the fused decode kernels have no norm biases (use_bias=true)"
    return None


@dataclass
class _Buffers:
    """One batch size's intermediates, reused by every step of that size (a captured graph replays them)."""

    x: tuple[Tensor, Tensor]  # the residual stream, alternating so no kernel reads what it writes
    proj: Tensor
    cell_sync: Tensor  # the cell kernel's per-(row, head) counters, zero between steps
    h: Tensor
    z: Tensor
    logits: Tensor
    pick: Any = None  # the argmax kernel's partial maxima and counters (kernels.ArgmaxBuffers), on first use


class FusedDecodeStep:
    """`step(token [B, 1], state) -> logits [B, 1, V]` for B in 1..`max_batch`; `state` (the graph's static
    buffers) is advanced in place. Batch 1 runs the GEMV kernels; B > 1 the row kernels, which read each
    weight tile once for all B rows."""

    def __init__(self, net: XLSTMForCausalLM, kernels: ModuleType):
        why = fused_decode_supported(net)
        if why:
            raise ValueError(why)
        net.fuse_projections()
        self.net, self.k = net, kernels
        self.max_batch = int(kernels.MAX_FUSED_BATCH)
        self._buffers: dict[int, _Buffers] = {}

    def supports(self, batch: int) -> bool:
        return 1 <= batch <= self.max_batch

    def _buffers_for(self, batch: int) -> _Buffers:
        if batch not in self._buffers:
            cfg, w = self.net.config, self.net.lm_head.weight
            f32 = {"dtype": torch.float32, "device": w.device}
            act = {"dtype": w.dtype, "device": w.device}
            self._buffers[batch] = _Buffers(
                x=(torch.empty(batch, cfg.hidden_size, **act), torch.empty(batch, cfg.hidden_size, **act)),
                proj=torch.empty(batch, 2 * cfg.qk_dim + 2 * cfg.v_dim + 2 * cfg.num_heads, **f32),
                cell_sync=self.k.cell_sync_buffer(batch, cfg.num_heads, w.device),
                h=torch.empty(batch, cfg.v_dim, **f32),
                z=torch.empty(batch, cfg.ffn_dim, **act),
                logits=torch.empty(batch, cfg.vocab_size, **f32))
        return self._buffers[batch]

    def argmax(self, logits: Tensor, out: Tensor) -> Tensor:
        """out [B, 1] = the greedy next token of each row of this step's `logits` [B, 1, V], in one launch."""
        batch = logits.shape[0]
        buf = self._buffers_for(batch)
        if buf.pick is None:
            buf.pick = self.k.argmax_buffers(batch, logits.shape[-1], logits.device)
        return self.k.argmax_rows(logits.view(batch, -1), out, buf.pick)

    @torch.inference_mode()
    def __call__(self, token: Tensor, state: ModelState) -> Tensor:
        if token.ndim != 2 or token.shape[1] != 1 or not self.supports(token.shape[0]):
            raise ValueError(f"the fused decode step takes one token for each of 1..{self.max_batch} rows, "
                             f"got shape {tuple(token.shape)}")
        net, k, cfg = self.net, self.k, self.net.config
        batch = token.shape[0]
        buf = self._buffers_for(batch)
        xa, xb = buf.x
        torch.index_select(net.backbone.embeddings.weight, 0, token.view(batch), out=xa)
        for block, block_state in zip(net.backbone.blocks, state):
            if block.is_slstm:
                y, new_state = block(xa.view(batch, 1, -1), block_state, None)
                for dst, src in zip(block_state, new_state):
                    dst.copy_(src)
                xa.copy_(y.view(batch, -1))
                continue
            layer, ffn = block.mlstm_layer, block.ffn  # projections fused in __init__
            norm, mh, fn = block.norm_mlstm, layer.multihead_norm, block.norm_ffn
            splits = layer.splits
            k.fused_gemv(xa, layer.in_weight, buf.proj, bias=layer.in_bias, rms_weight=norm.weight, eps=norm.eps)
            k.mlstm_decode_cell(buf.proj, splits, cfg.num_heads, block_state, buf.cell_sync, buf.h, cfg.gate_soft_cap,
                                eps=EPS)
            o_gate = buf.proj[:, 2 * splits[0] + splits[2]:2 * splits[0] + 2 * splits[2]]
            k.fused_gemv(buf.h, layer.out_proj.weight, xb, bias=layer.out_proj.bias, residual=xa,
                         head_norm=(mh.weight, o_gate, cfg.v_head_dim), eps=mh.eps)
            k.fused_gemv(xb, ffn.up_weight, buf.z, bias=ffn.up_bias, rms_weight=fn.weight, swiglu=True, eps=fn.eps)
            k.fused_gemv(buf.z, ffn.proj_down.weight, xa, bias=ffn.proj_down.bias, residual=xb)
        out_norm = net.backbone.out_norm
        k.fused_gemv(xa, net.lm_head.weight, buf.logits, rms_weight=out_norm.weight, eps=out_norm.eps,
                     soft_cap=cfg.output_logit_soft_cap)
        return buf.logits.view(batch, 1, -1)
