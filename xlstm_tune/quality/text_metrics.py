"""Cheap, deterministic text-quality metrics for generated continuations.

Fidelity (fidelity.py) says whether a tuned configuration reproduces the reference logits; these
metrics describe the *text* itself, so a study can notice degenerate output (loops, repeated
phrases) and compare it across models and precisions without an LLM judge. Perplexity of the
continuation under the model is the usual likelihood-based companion.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from xlstm_tune.errors import UserError

__all__ = [
    "distinct_n",
    "repetition_rate",
    "text_metrics",
    "continuation_nll",
    "continuation_perplexity",
]


def _token_list(tokens: Sequence[Hashable] | str | Tensor) -> list[Any]:
    """Normalise the accepted inputs to a list of hashable tokens.

    A ``str`` is split on whitespace (word n-grams: character n-grams are rarely what is meant);
    a 1-D tensor of token ids becomes a list of ints.
    """
    if isinstance(tokens, str):
        return tokens.split()
    if isinstance(tokens, Tensor):
        if tokens.dim() != 1:
            raise ValueError(f"token tensor must be 1-D, got shape {tuple(tokens.shape)}")
        return tokens.tolist()
    return list(tokens)


def _ngrams(tokens: list[Any], n: int) -> list[tuple[Any, ...]]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[Hashable] | str | Tensor, n: int) -> float:
    """Unique n-grams / total n-grams (the "distinct-n" diversity score; 1.0 = no n-gram repeats).

    Returns 0.0 when the input is shorter than ``n`` (there is no n-gram to be diverse).
    """
    grams = _ngrams(_token_list(tokens), n)
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def repetition_rate(tokens: Sequence[Hashable] | str | Tensor, n: int = 4) -> float:
    """Fraction of n-grams that repeat an n-gram seen earlier in the sequence.

    High values flag the looping output that broken kernels and bad sampling produce. Equals
    ``1 - distinct_n`` but is read the other way round (0.0 = no repetition); 0.0 for short input.
    """
    grams = _ngrams(_token_list(tokens), n)
    if not grams:
        return 0.0
    seen: set[tuple[Any, ...]] = set()
    repeats = 0
    for g in grams:
        if g in seen:
            repeats += 1
        else:
            seen.add(g)
    return repeats / len(grams)


def text_metrics(tokens: Sequence[Hashable] | str | Tensor) -> dict[str, float]:
    """distinct-1/2/3, 4-gram repetition rate and the token count, for one continuation."""
    toks = _token_list(tokens)
    return {
        "distinct_1": distinct_n(toks, 1),
        "distinct_2": distinct_n(toks, 2),
        "distinct_3": distinct_n(toks, 3),
        "repetition_rate": repetition_rate(toks, 4),
        "n_tokens": float(len(toks)),
    }


def continuation_nll(logits: Tensor, token_ids: Tensor, prompt_len: int) -> tuple[float, int]:
    """Mean negative log-likelihood (nats/token) of the continuation, and how many tokens it covers.

    ``logits`` [S, V] come from ONE teacher-forced forward pass over ``token_ids`` [S] =
    prompt + continuation. The token at position ``t`` (``t >= prompt_len``) is scored by the
    distribution predicted at position ``t - 1`` (log-softmax in float64); the last row of ``logits``
    predicts beyond the sequence and is unused. A batch dimension of size 1 is accepted.

    Raises:
        UserError: ``prompt_len < 1`` (the first continuation token needs a prediction) or there is
            no continuation token (``prompt_len >= S``).
        ValueError: the shapes do not fit each other.
    """
    if logits.dim() == 3 and logits.shape[0] == 1:
        logits = logits[0]
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if logits.dim() != 2 or token_ids.dim() != 1:
        raise ValueError(
            f"expected logits [S, V] and token_ids [S], got {tuple(logits.shape)} and "
            f"{tuple(token_ids.shape)}"
        )
    seq_len = token_ids.shape[0]
    if logits.shape[0] != seq_len:
        raise ValueError(f"logits cover {logits.shape[0]} positions but token_ids has {seq_len}")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or prompt_len < 1:
        raise UserError(
            f"prompt_len must be an integer >= 1 (got {prompt_len!r}); give the prompt at least one token"
        )
    if prompt_len >= seq_len:
        raise UserError(
            f"no continuation tokens to score (prompt_len {prompt_len} >= sequence length {seq_len}); "
            "generate at least one new token"
        )
    ids = token_ids.detach().to("cpu", torch.long)
    vocab = logits.shape[1]
    if ids.min().item() < 0 or ids.max().item() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}), got range "
                         f"[{ids.min().item()}, {ids.max().item()}]")
    log_probs = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=-1)
    # Row t-1 predicts token t, for t in [prompt_len, S).
    predictors = log_probs[prompt_len - 1 : seq_len - 1]
    targets = ids[prompt_len:seq_len]
    nll = -predictors.gather(1, targets.unsqueeze(1)).squeeze(1)
    count = int(targets.numel())
    return float(nll.mean().item()), count


def continuation_perplexity(logits: Tensor, token_ids: Tensor, prompt_len: int) -> float:
    """exp(mean NLL) of the continuation; see :func:`continuation_nll` for the alignment."""
    nll, _ = continuation_nll(logits, token_ids, prompt_len)
    try:
        return math.exp(nll)
    except OverflowError:
        return math.inf
