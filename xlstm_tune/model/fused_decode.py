"""Batch-1 decode step on the fused decode kernels, updating the state in place (what `graph` captures).

Per mLSTM block: RMS norm + q|k|v|o|i|f product, gates, state update and read-out, head norm + output
gate + out projection + residual, RMS norm + SwiGLU product, down projection + residual -- six
launches. sLSTM blocks run their plain step. Intermediates live in buffers owned by the step, so a
captured graph replays with no allocation; the residual stream alternates between two buffers so no
kernel reads what it writes.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from xlstm_tune.kernels.mlstm import EPS
from xlstm_tune.model.xlstm import ModelState, XLSTMForCausalLM


def fused_decode_supported(net: XLSTMForCausalLM) -> str | None:
    """None if `net` can use the fused step, else why not (the caller then captures the generic step)."""
    if net.config.use_bias:
        return "the fused decode kernels have no norm biases (use_bias=true)"
    return None


class FusedDecodeStep:
    """`step(token [1, 1], state) -> logits [1, 1, V]`; `state` (the graph's static buffers) is advanced."""

    def __init__(self, net: XLSTMForCausalLM, kernels: ModuleType):
        why = fused_decode_supported(net)
        if why:
            raise ValueError(why)
        net.fuse_projections()
        self.net, self.k = net, kernels
        cfg = net.config
        w = net.lm_head.weight
        opts = {"device": w.device}
        self.x = (torch.empty(cfg.hidden_size, dtype=w.dtype, **opts), torch.empty(cfg.hidden_size, dtype=w.dtype, **opts))
        self.proj = torch.empty(2 * cfg.qk_dim + 2 * cfg.v_dim + 2 * cfg.num_heads, dtype=torch.float32, **opts)
        self.scratch = torch.empty(cfg.num_heads * 4, dtype=torch.float32, **opts)
        self.h = torch.empty(cfg.v_dim, dtype=torch.float32, **opts)
        self.z = torch.empty(cfg.ffn_dim, dtype=w.dtype, **opts)
        self.logits = torch.empty(cfg.vocab_size, dtype=torch.float32, **opts)

    @torch.inference_mode()
    def __call__(self, token: Tensor, state: ModelState) -> Tensor:
        if token.shape != (1, 1):
            raise ValueError(f"the fused decode step takes one token of batch 1, got shape {tuple(token.shape)}")
        net, k, cfg = self.net, self.k, self.net.config
        xa, xb = self.x
        torch.index_select(net.backbone.embeddings.weight, 0, token.view(1), out=xa.view(1, -1))
        for block, block_state in zip(net.backbone.blocks, state):
            if block.is_slstm:
                y, new_state = block(xa.view(1, 1, -1), block_state, None)
                for dst, src in zip(block_state, new_state):
                    dst.copy_(src)
                xa.copy_(y.view(-1))
                continue
            layer, ffn = block.mlstm_layer, block.ffn  # projections fused in __init__
            norm, mh, fn = block.norm_mlstm, layer.multihead_norm, block.norm_ffn
            splits = layer.splits
            k.fused_gemv(xa, layer.in_weight, self.proj, bias=layer.in_bias, rms_weight=norm.weight, eps=norm.eps)
            k.mlstm_decode_cell(self.proj, splits, cfg.num_heads, block_state, self.scratch, self.h, cfg.gate_soft_cap,
                                eps=EPS)
            o_gate = self.proj[2 * splits[0] + splits[2]:2 * splits[0] + 2 * splits[2]]
            k.fused_gemv(self.h, layer.out_proj.weight, xb, bias=layer.out_proj.bias, residual=xa,
                         head_norm=(mh.weight, o_gate, cfg.v_head_dim), eps=mh.eps)
            k.fused_gemv(xb, ffn.up_weight, self.z, bias=ffn.up_bias, rms_weight=fn.weight, swiglu=True, eps=fn.eps)
            k.fused_gemv(self.z, ffn.proj_down.weight, xa, bias=ffn.proj_down.bias, residual=xb)
        out_norm = net.backbone.out_norm
        k.fused_gemv(xa, net.lm_head.weight, self.logits, rms_weight=out_norm.weight, eps=out_norm.eps,
                     soft_cap=cfg.output_logit_soft_cap)
        return self.logits.view(1, 1, -1)
