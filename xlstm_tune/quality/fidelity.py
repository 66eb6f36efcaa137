"""Fidelity of a tuned configuration's logits against the canonical reference path.

A speed knob must never change the model's answers (docs/DESIGN.md §3). These metrics quantify "the same
answers" from several angles: the project's tolerance metric (relative L2 error of the logits), the
worst single position, the divergence of the next-token distributions, and whether greedy decoding
would pick the same tokens. Everything is computed in float64 so that the check itself adds no error.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from xlstm_tune.runtime.device import float64_device

__all__ = ["fidelity_metrics", "fidelity_passed"]

# Positions are processed in blocks of about this many logits, so that a 50k vocabulary over
# thousands of positions never needs several GB of float64 temporaries at once.
_BLOCK_ELEMS = 1 << 22


def _as_positions(t: Tensor, name: str) -> Tensor:
    """[B, S, V] or [S, V] -> [P, V] view with one row per position (dtype and device unchanged)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape [B, S, V] or [S, V], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.detach().reshape(-1, t.shape[-1])


def fidelity_metrics(logits: Tensor, ref_logits: Tensor) -> dict[str, float]:
    """Compare ``logits`` with ``ref_logits`` ([B, S, V] or [S, V]); all maths in float64 on CPU.

    Returns:
        ``max_abs_err``: largest absolute difference of any logit.
        ``rel_err``: ‖out − ref‖₂ / ‖ref‖₂ over the whole tensor (the project's tolerance metric).
        ``max_rel_err``: the same ratio per position (over V), maximised over positions; catches one
            bad position hidden in a long sequence.
        ``kl_mean`` / ``kl_max``: KL(ref ‖ out) of the next-token softmax, mean / max over positions.
        ``greedy_agreement``: fraction of positions whose argmax token is the same.

    A zero reference norm gives a relative error of 0 when ``out`` is zero too, else ``inf``. NaN in
    either input propagates to NaN metrics (and :func:`fidelity_passed` rejects NaN).

    Raises:
        ValueError: the shapes differ, a tensor is not [B, S, V] / [S, V], or there are no positions.
    """
    if tuple(logits.shape) != tuple(ref_logits.shape):
        raise ValueError(
            f"logits shape {tuple(logits.shape)} != reference shape {tuple(ref_logits.shape)}"
        )
    out_all = _as_positions(logits, "logits")
    ref_all = _as_positions(ref_logits, "ref_logits")
    n_pos, vocab = out_all.shape
    if n_pos == 0 or vocab == 0:
        raise ValueError(f"logits have no positions or an empty vocabulary: {tuple(logits.shape)}")

    sum_sq_diff = 0.0
    sum_sq_ref = 0.0
    max_abs_err = 0.0
    pos_rel_parts: list[Tensor] = []
    kl_parts: list[Tensor] = []
    agree = 0
    any_nan = False
    device = float64_device(out_all.device)  # MPS has no float64: it computes on the CPU
    block = max(1, _BLOCK_ELEMS // vocab)
    for start in range(0, n_pos, block):
        out = out_all[start : start + block].to(device=device, dtype=torch.float64)
        ref = ref_all[start : start + block].to(device=device, dtype=torch.float64)
        diff = out - ref
        lo, hi = (v.item() for v in torch.aminmax(diff))  # one pass, no |diff| temporary
        if math.isnan(lo) or math.isnan(hi) or math.isnan(max_abs_err):
            max_abs_err = math.nan
        else:
            max_abs_err = max(max_abs_err, -lo, hi)

        pos_diff = torch.linalg.vector_norm(diff, dim=-1)
        pos_ref = torch.linalg.vector_norm(ref, dim=-1)
        sum_sq_diff += pos_diff.square().sum().item()
        sum_sq_ref += pos_ref.square().sum().item()
        # A NaN (or inf - inf) anywhere in a row makes that row's norm NaN: the row is unverifiable.
        bad_rows = torch.isnan(pos_diff) | torch.isnan(pos_ref)
        ratio = pos_diff / torch.where(pos_ref > 0, pos_ref, torch.ones_like(pos_ref))
        inf_or_zero = torch.where(pos_diff > 0, math.inf, 0.0).to(pos_diff.dtype)
        pos_rel = torch.where(pos_ref > 0, ratio, inf_or_zero)
        pos_rel_parts.append(torch.where(bad_rows, torch.nan, pos_rel).cpu())

        log_p_ref = torch.log_softmax(ref, dim=-1)
        log_p_out = torch.log_softmax(out, dim=-1)
        # p_ref * (log p_ref - log p_out). In a row without NaN input, NaN only comes from
        # 0 * (-inf) where the reference gives a token probability 0: that term is 0 (0 log 0 = 0).
        terms = log_p_ref.exp() * (log_p_ref - log_p_out)
        kl = torch.nan_to_num(terms, nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=-1)
        kl_parts.append(torch.where(bad_rows, torch.nan, kl.clamp_min(0.0)).cpu())  # clamp: round-off

        agree += int(((out.argmax(dim=-1) == ref.argmax(dim=-1)) & ~bad_rows).sum().item())
        any_nan = any_nan or bool(bad_rows.any())

    pos_rel_all = torch.cat(pos_rel_parts)
    kl_all = torch.cat(kl_parts)
    return {
        "max_abs_err": float(max_abs_err),
        "rel_err": float(_safe_ratio(math.sqrt(sum_sq_diff), math.sqrt(sum_sq_ref))),
        "max_rel_err": float(pos_rel_all.max().item()),
        "kl_mean": float(kl_all.mean().item()),
        "kl_max": float(kl_all.max().item()),
        "greedy_agreement": math.nan if any_nan else agree / n_pos,
    }


def _safe_ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def fidelity_passed(
    metrics: Mapping[str, float], rel_tol: float, min_greedy_agreement: float | None = None
) -> bool:
    """True when ``rel_err <= rel_tol`` (and greedy agreement is high enough, if asked).

    A configuration whose metrics contain NaN never passes: NaN means the check could not vouch for
    the output, and an unverified configuration must not become the tuned default.
    """
    if isinstance(rel_tol, bool) or not (isinstance(rel_tol, (int, float)) and rel_tol >= 0):
        raise ValueError(f"rel_tol must be a number >= 0, got {rel_tol!r}")
    if "rel_err" not in metrics:
        raise ValueError("metrics lack 'rel_err'; compute them with fidelity_metrics()")
    for value in metrics.values():
        if isinstance(value, float) and math.isnan(value):
            return False
    if not float(metrics["rel_err"]) <= rel_tol:
        return False
    if min_greedy_agreement is not None:
        if "greedy_agreement" not in metrics:
            raise ValueError("metrics lack 'greedy_agreement'; compute them with fidelity_metrics()")
        if not float(metrics["greedy_agreement"]) >= min_greedy_agreement:
            return False
    return True
