"""Fidelity and text metrics on hand-computable inputs, plus fresh random cross-checks.

Random tests take the conftest ``seed`` fixture (fresh per run, seeds torch); pytest lists it on failure.
"""
from __future__ import annotations

import math

import pytest
import torch

from xlstm_tune.errors import UserError
from xlstm_tune.quality import fidelity
from xlstm_tune.quality.fidelity import fidelity_metrics, fidelity_passed
from xlstm_tune.quality.text_metrics import (
    continuation_nll,
    continuation_perplexity,
    distinct_n,
    repetition_rate,
    text_metrics,
)

LN2 = math.log(2.0)

# ------------------------------------------------------------------------------------- fidelity


def test_fidelity_hand_computed() -> None:
    ref = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    out = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 3.0]])
    m = fidelity_metrics(out, ref)
    assert m["max_abs_err"] == 3.0
    assert m["rel_err"] == pytest.approx(3.0 / 5.0, abs=1e-15)  # ‖(0,0,0,0,0,3)‖ / ‖(3,0,0,0,4,0)‖
    assert m["max_rel_err"] == pytest.approx(3.0 / 4.0, abs=1e-15)  # position 1: 3 / 4
    assert m["greedy_agreement"] == 1.0  # 4 > 3 keeps token 1 on top
    # KL(ref‖out) at position 1 by hand; position 0 is identical (KL 0).
    zp, zq = 2 + math.exp(4), 1 + math.exp(4) + math.exp(3)
    p = [1 / zp, math.exp(4) / zp, 1 / zp]
    q = [1 / zq, math.exp(4) / zq, math.exp(3) / zq]
    kl1 = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert m["kl_max"] == pytest.approx(kl1, rel=1e-12)
    assert m["kl_mean"] == pytest.approx(kl1 / 2, rel=1e-12)


def test_fidelity_kl_closed_form_and_greedy_disagreement() -> None:
    ref = torch.tensor([[0.0, 0.0]])  # uniform p = (1/2, 1/2)
    out = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # q = (3/4, 1/4)
    m = fidelity_metrics(out, ref)
    assert m["kl_mean"] == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-12)
    # A token the reference rules out (p = 0) contributes 0, not NaN: KL = -log q(1) = log(1 + e^-5).
    m = fidelity_metrics(torch.tensor([[-5.0, 0.0]]), torch.tensor([[-math.inf, 0.0]]))
    assert m["kl_mean"] == pytest.approx(math.log1p(math.exp(-5.0)), rel=1e-6)
    ref2 = torch.tensor([[0.0, 4.0, 0.0], [1.0, 0.0, 0.0]])
    out2 = torch.tensor([[0.0, 4.0, 5.0], [1.0, 0.0, 0.0]])
    assert fidelity_metrics(out2, ref2)["greedy_agreement"] == 0.5


def test_fidelity_identical_and_zero_reference(seed: int) -> None:
    x = torch.randn(2, 5, 11)
    m = fidelity_metrics(x.clone(), x)
    assert m == {"max_abs_err": 0.0, "rel_err": 0.0, "max_rel_err": 0.0, "kl_mean": 0.0,
                 "kl_max": 0.0, "greedy_agreement": 1.0}
    z = torch.zeros(3, 4)
    assert fidelity_metrics(z, z)["rel_err"] == 0.0
    assert fidelity_metrics(z + 1, z)["rel_err"] == math.inf


def test_fidelity_random_relative_scaling_is_exact_in_float64(seed: int) -> None:
    ref = torch.randn(2, 7, 50, dtype=torch.float32)
    eps = 1e-6
    out = (ref.double() * (1 + eps)).float()  # float32 rounding adds < 1e-7 relative noise
    m = fidelity_metrics(out, ref)
    exact = (torch.linalg.vector_norm(out.double() - ref.double()) / torch.linalg.vector_norm(ref.double())).item()
    assert m["rel_err"] == pytest.approx(exact, rel=1e-12)
    assert m["rel_err"] == pytest.approx(eps, rel=0.2)
    assert m["max_rel_err"] >= m["rel_err"] * 0.5 and m["greedy_agreement"] == 1.0
    assert 0.0 <= m["kl_mean"] <= m["kl_max"] < 1e-9
    # [B, S, V] and the flattened [B*S, V] describe the same positions.
    assert fidelity_metrics(out.reshape(14, 50), ref.reshape(14, 50)) == m
    # low-precision inputs are accepted and upcast
    assert fidelity_metrics(out.bfloat16(), ref.bfloat16())["rel_err"] < 1e-2


def test_fidelity_one_bad_position_shows_in_max_rel_err(seed: int) -> None:
    ref = torch.randn(64, 32, dtype=torch.float64)
    out = ref.clone()
    out[17] += 0.5 * ref[17]
    m = fidelity_metrics(out, ref)
    assert m["max_rel_err"] == pytest.approx(0.5, rel=1e-12)
    assert m["rel_err"] < 0.1  # diluted over 64 positions


def test_fidelity_blocked_equals_unblocked(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    # Large vocabularies are processed in blocks of positions; the result must not depend on it.
    ref = torch.randn(3, 13, 11)
    out = ref + 1e-3 * torch.randn(3, 13, 11)
    out[2, 5] = ref[2, 5].flip(-1)  # one position with a different argmax and large error
    whole = fidelity_metrics(out, ref)
    monkeypatch.setattr(fidelity, "_BLOCK_ELEMS", 50)  # 4 positions per block, ragged last block
    blocked = fidelity_metrics(out, ref)
    assert blocked.keys() == whole.keys()
    for k in whole:
        assert blocked[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-15), k
    out[0, 0, 0] = math.nan  # NaN in the first block still reaches the final answer
    assert math.isnan(fidelity_metrics(out, ref)["max_abs_err"])


def test_fidelity_shape_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        fidelity_metrics(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"\[B, S, V\]"):
        fidelity_metrics(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="floating"):
        fidelity_metrics(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_fidelity_passed() -> None:
    good = {"rel_err": 5e-5, "greedy_agreement": 1.0, "kl_mean": 0.0}
    assert fidelity_passed(good, 1e-4)
    assert not fidelity_passed(good, 1e-5)
    assert fidelity_passed({**good, "greedy_agreement": 0.9}, 1e-4, min_greedy_agreement=0.9)
    assert not fidelity_passed({**good, "greedy_agreement": 0.5}, 1e-4, min_greedy_agreement=0.9)
    # NaN never passes, whatever the tolerance and whichever metric carries it.
    assert not fidelity_passed({**good, "rel_err": math.nan}, 1e9)
    assert not fidelity_passed({**good, "kl_mean": math.nan}, 1e9)
    assert not fidelity_passed({**good, "rel_err": math.inf}, 1e9)
    with pytest.raises(ValueError):
        fidelity_passed({"kl_mean": 0.0}, 1e-4)
    with pytest.raises(ValueError):
        fidelity_passed(good, -1.0)


def test_fidelity_nan_output_fails(seed: int) -> None:
    ref = torch.randn(3, 4, 5)
    out = ref.clone()
    out[1, 2, 3] = math.nan
    m = fidelity_metrics(out, ref)
    assert math.isnan(m["rel_err"]) and math.isnan(m["max_rel_err"]) and math.isnan(m["kl_max"])
    assert math.isnan(m["greedy_agreement"]) and math.isnan(m["max_abs_err"])
    assert not fidelity_passed(m, rel_tol=1e9)


# --------------------------------------------------------------------------------- text metrics


def test_distinct_n_hand_computed() -> None:
    toks = ["a", "b", "a", "b"]
    assert distinct_n(toks, 1) == 0.5  # {a, b} / 4
    assert distinct_n(toks, 2) == pytest.approx(2 / 3)  # (a,b) (b,a) (a,b)
    assert distinct_n(toks, 3) == 1.0  # (a,b,a) (b,a,b)
    assert distinct_n(toks, 5) == 0.0  # too short: no 5-gram
    assert distinct_n([], 1) == 0.0
    assert distinct_n("a b a b", 1) == 0.5  # a str is split into words
    assert distinct_n(torch.tensor([5, 5, 5, 7]), 1) == 0.5  # token ids
    with pytest.raises(ValueError):
        distinct_n(toks, 0)


def test_repetition_rate_hand_computed() -> None:
    toks = [1, 2, 3, 4, 1, 2, 3, 4, 1]
    # 4-grams: 1234 2341 3412 4123 1234* 2341*  -> 2 of 6 repeat an earlier one
    assert repetition_rate(toks, 4) == pytest.approx(1 / 3)
    assert repetition_rate(toks, 1) == pytest.approx(5 / 9)  # 1,2,3,4 new; the other 5 repeat
    assert repetition_rate([1, 2, 3], 4) == 0.0
    assert repetition_rate(list(range(20))) == 0.0
    assert repetition_rate([9] * 10) == pytest.approx(6 / 7)  # 7 4-grams, all but the first repeat


def test_text_metrics_bundle() -> None:
    m = text_metrics([1, 2, 1, 2, 1, 2])
    assert m == {
        "distinct_1": pytest.approx(2 / 6),
        "distinct_2": pytest.approx(2 / 5),
        "distinct_3": pytest.approx(2 / 4),
        "repetition_rate": pytest.approx(1 / 3),  # 1212 2121 1212*
        "n_tokens": 6.0,
    }


def _alignment_case() -> tuple[torch.Tensor, torch.Tensor, int]:
    """V=3, S=5, prompt_len=2: each predicting row puts probability 1/2 on the NEXT token.

    Row t-1 = [0, 0, 0] with ln 2 at ids[t] -> softmax gives 2/4 = 1/2 to ids[t], 1/4 to the others.
    Rows not used by the correct alignment (row 0 predicts a prompt token, row 4 predicts beyond the
    sequence) hold extreme values so that using them would change the answer a lot.
    """
    ids = torch.tensor([0, 1, 2, 0, 1])
    logits = torch.zeros(5, 3, dtype=torch.float64)  # float64 so that ln 2 is exact to 1e-16
    for t in range(2, 5):
        logits[t - 1, ids[t]] = LN2
    logits[0] = torch.tensor([50.0, -50.0, 0.0])
    logits[4] = torch.tensor([-50.0, 50.0, -50.0])
    return logits, ids, 2


def test_continuation_perplexity_alignment_is_exactly_two() -> None:
    logits, ids, prompt_len = _alignment_case()
    nll, count = continuation_nll(logits, ids, prompt_len)
    assert count == 3
    assert nll == pytest.approx(LN2, abs=1e-12)
    assert continuation_perplexity(logits, ids, prompt_len) == pytest.approx(2.0, abs=1e-12)
    # The same data read one position off (row t scoring token t) gives a clearly different value:
    # rows 2 and 3 give the wrong token 1/4, row 4 gives its token ~1, so ppl = (4 * 4 * 1)^(1/3).
    log_p = torch.log_softmax(logits, -1)
    off_by_one = math.exp(-sum(log_p[t, ids[t]].item() for t in range(2, 5)) / 3)
    assert off_by_one == pytest.approx(16 ** (1 / 3), rel=1e-12)
    assert continuation_perplexity(logits, ids, prompt_len) != pytest.approx(off_by_one, rel=1e-3)
    # A batch dimension of 1 is accepted.
    assert continuation_perplexity(logits[None], ids[None], prompt_len) == pytest.approx(2.0, abs=1e-12)


def test_continuation_perplexity_uniform_and_cross_entropy(seed: int) -> None:
    assert continuation_perplexity(torch.zeros(6, 3), torch.tensor([0, 1, 2, 2, 1, 0]), 1) == pytest.approx(3.0)
    logits = torch.randn(9, 17)
    ids = torch.randint(0, 17, (9,))
    nll, count = continuation_nll(logits, ids, 4)
    ce = torch.nn.functional.cross_entropy(logits[3:8].double(), ids[4:9]).item()
    assert count == 5 and nll == pytest.approx(ce, rel=1e-12)


def test_continuation_errors() -> None:
    logits, ids, _ = _alignment_case()
    with pytest.raises(UserError, match="prompt_len must be an integer >= 1"):
        continuation_nll(logits, ids, 0)
    with pytest.raises(UserError, match="no continuation tokens"):
        continuation_nll(logits, ids, 5)
    with pytest.raises(ValueError, match="positions"):
        continuation_nll(logits[:4], ids, 2)
    with pytest.raises(ValueError):
        continuation_nll(logits, torch.tensor([0, 1, 2, 0, 3]), 2)  # id outside the vocabulary
