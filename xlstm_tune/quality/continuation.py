"""Score one generated continuation: how varied its tokens are, and how likely the model finds it.

A study saves each trial's greedy continuation. Fidelity (fidelity.py) already proves the tuned
logits match the reference; these scores describe the text itself, so degenerate output (loops,
collapsed vocabulary) is visible in the study's records and comparable across models and dtypes.

Perplexity is always computed on the **canonical reference path** (``model.reference_forward``),
whatever knobs the model is configured with: the score must describe the text, not the backend
that happened to produce it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from xlstm_tune.errors import UserError
from xlstm_tune.quality.text_metrics import continuation_perplexity, distinct_n, repetition_rate

if TYPE_CHECKING:  # pragma: no cover
    from xlstm_tune.model.language_model import LanguageModel

__all__ = ["CONTINUATION_KEYS", "score_continuation"]

#: The keys of :func:`score_continuation`'s result, in a stable order (for CSV columns).
CONTINUATION_KEYS: tuple[str, ...] = (
    "distinct_1", "distinct_2", "distinct_3", "repetition_rate", "perplexity", "continuation_tokens",
)


def _one_row(ids: Any, name: str) -> Tensor:
    """[1, N] or [N] integer ids -> a [N] long tensor on the CPU (batch 1 only: one continuation)."""
    t = torch.as_tensor(ids)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise UserError(f"{name} must hold one sequence ([1, N]), got shape {tuple(t.shape)}; "
                            "score one continuation at a time")
        t = t[0]
    if t.dim() != 1:
        raise UserError(f"{name} must have shape [1, N] or [N], got {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"{name} must be integer token ids, got dtype {t.dtype}")
    return t.detach().to("cpu", torch.long)


@torch.inference_mode()
def score_continuation(
    model: "LanguageModel", prompt_ids: Tensor, continuation_ids: Tensor
) -> dict[str, float | int]:
    """Text metrics and reference-path perplexity of ``continuation_ids`` given ``prompt_ids``.

    Args:
        model: a loaded model; only its canonical ``reference_forward`` is used (its knobs are ignored).
        prompt_ids: ``[1, P]`` (or ``[P]``) token ids of the prompt, ``P >= 1``.
        continuation_ids: ``[1, C]`` (or ``[C]``) token ids the model produced after the prompt, ``C >= 1``.

    Returns:
        ``distinct_1``/``_2``/``_3``: unique / total token n-grams of the continuation (token ids, not
        words: tokenizer-agnostic and what the model actually emitted).
        ``repetition_rate``: share of 4-grams repeating an earlier 4-gram (0.0 for C < 4).
        ``perplexity``: exp(mean NLL) of the continuation tokens under ONE teacher-forced reference
        pass over prompt + continuation (token ``t`` scored by the prediction at ``t - 1``).
        ``continuation_tokens``: C.

    Raises:
        UserError: an empty prompt or continuation, a batch of several sequences, ids that are not
            integers or lie outside the vocabulary.
    """
    prompt = _one_row(prompt_ids, "prompt_ids")
    cont = _one_row(continuation_ids, "continuation_ids")
    if prompt.numel() == 0:
        raise UserError("prompt_ids is empty: the first continuation token needs a prompt to be scored against")
    if cont.numel() == 0:
        raise UserError("continuation_ids is empty: generate at least one new token to score")
    full = torch.cat([prompt, cont])
    vocab = int(model.config.vocab_size)
    lo, hi = int(full.min().item()), int(full.max().item())
    if lo < 0 or hi >= vocab:
        raise UserError(f"token ids must lie in [0, {vocab}) for this model, got range [{lo}, {hi}]; "
                        "encode the text with this model's tokenizer")

    logits, _ = model.reference_forward(full[None])
    tokens = cont.tolist()
    return {
        "distinct_1": distinct_n(tokens, 1),
        "distinct_2": distinct_n(tokens, 2),
        "distinct_3": distinct_n(tokens, 3),
        "repetition_rate": repetition_rate(tokens, 4),
        "perplexity": continuation_perplexity(logits[0], full, int(prompt.numel())),
        "continuation_tokens": int(cont.numel()),
    }
