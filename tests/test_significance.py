"""Confirmation statistics (study.significance) and the choice built on them (study.confirm), on constructed
paired data: a clear winner, a tie, a trade-off, too few rounds, high noise; then the worker's real pairing."""
from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest

from xlstm_tune.errors import UserError
from xlstm_tune.study import confirm
from xlstm_tune.study.significance import (
    NO_EVIDENCE,
    NOT_WORSE,
    TRADED,
    WINS,
    WORSE,
    Rule,
    bootstrap_interval,
    estimate,
    interval,
    geometric_mean,
    is_winner,
    paired_ratios,
    t_interval,
)
from xlstm_tune.tracking.best_export import build_best

SEED = random.randrange(2**32)
RNG = random.Random(SEED)

DEFAULT_KNOBS = dict(backend="queued", chunk_size=32, heads_per_band=4, workers=1, t_inner=1, streams=0,
                     decode_mode="eager")


def pairs_with(ratios: list[float], base: float = 1000.0, drift: float = 0.0) -> list[tuple[float, float]]:
    """(default, candidate) pairs whose candidate/default ratio is exactly `ratios`; the default is random
    and, with `drift`, wanders by up to that factor between rounds (a machine that slows down and recovers)."""
    out = []
    for r in ratios:
        d = base * RNG.uniform(1.0, 1.0 + drift) * RNG.uniform(0.97, 1.03)
        out.append((d, d * r))
    return out


def noisy(center: float, spread: float, n: int) -> list[float]:
    return [center * math.exp(RNG.gauss(0.0, spread)) for _ in range(n)]


# ---- the statistics ----------------------------------------------------------------------------------
def test_paired_ratios_use_each_measurement_median_and_drop_unusable_pairs() -> None:
    pairs = [([10.0, 30.0, 20.0], [40.0, 44.0, 50.0]), (None, [5.0]), ([0.0], [3.0]), (8.0, 4.0)]
    assert paired_ratios(pairs) == pytest.approx([44.0 / 20.0, 0.5])


def test_clear_winner_wins() -> None:
    seed = SEED
    est = estimate(pairs_with(noisy(1.6, 0.04, 6)), Rule())
    assert est is not None and est.verdict == WINS, f"seed {seed}: {est}"
    assert 1.0 < est.low <= est.speedup <= est.high, f"seed {seed}: {est}"
    assert est.rounds == 6


def test_tie_is_not_a_win() -> None:
    ratios = [0.93, 1.06, 0.98, 1.04, 1.0, 0.97]
    est = estimate(pairs_with(ratios), Rule())
    assert est is not None and est.low < 1.0 < est.high
    assert est.verdict == NOT_WORSE
    assert est.speedup == pytest.approx(geometric_mean(ratios))


def test_significant_loss_is_worse_and_max_trade_allows_it_within_the_allowance() -> None:
    ratios = noisy(0.86, 0.02, 5)  # about 14% slower, every round
    assert estimate(pairs_with(ratios), Rule()).verdict == WORSE
    assert estimate(pairs_with(ratios), Rule(max_trade=0.25)).verdict == TRADED
    assert estimate(pairs_with(ratios), Rule(max_trade=0.05)).verdict == WORSE  # lost more than allowed


def test_too_few_rounds_is_not_enough_evidence() -> None:
    est = estimate(pairs_with([3.0, 3.1]), Rule())  # huge, but only two rounds
    assert est.rounds == 2 and est.verdict == NO_EVIDENCE
    assert estimate(pairs_with([3.0, 3.1]), Rule(min_rounds=2)).verdict == WINS


def test_high_noise_hides_a_higher_mean() -> None:
    ratios = [3.0, 0.45, 2.6, 0.5, 1.9, 0.7]  # geometric mean above 1, but no round agrees with the next
    assert geometric_mean(ratios) > 1.0
    est = estimate(pairs_with(ratios), Rule())
    assert est.low < 1.0 and est.verdict == NOT_WORSE


def test_pairing_cancels_drift_that_pooling_cannot() -> None:
    """The machine's speed varies 4x between rounds; the candidate is 1.15x its paired default in every round."""
    pairs = pairs_with(noisy(1.15, 0.01, 5), drift=3.0)
    est = estimate(pairs, Rule())
    assert est.verdict == WINS and est.low > 1.05
    pooled_default = [d for d, _ in pairs]
    pooled_cand = [c for _, c in pairs]
    # Pooled, the spreads overlap: the candidate's slowest round is slower than the default's fastest.
    assert min(pooled_cand) < max(pooled_default)


def test_bootstrap_is_seeded_and_agrees_with_a_normal_interval_on_many_rounds() -> None:
    logs = [RNG.gauss(0.1, 0.2) for _ in range(400)]
    ratios = [math.exp(v) for v in logs]
    lo, hi = bootstrap_interval(ratios, 0.95)
    assert (lo, hi) == bootstrap_interval(list(ratios), 0.95)  # same data, same verdict, every time
    # Independent reference: mean of the logs +- 1.96 standard errors.
    m, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    assert math.log(lo) == pytest.approx(m - 1.96 * se, abs=0.25 * se)
    assert math.log(hi) == pytest.approx(m + 1.96 * se, abs=0.25 * se)
    lo90, hi90 = bootstrap_interval(ratios, 0.90)
    assert lo < lo90 < hi90 < hi  # a lower confidence gives a narrower interval


def test_three_scattered_rounds_above_one_are_not_a_win() -> None:
    ratios = [1.02, 1.10, 1.01]
    assert bootstrap_interval(ratios)[0] > 1.0  # the bootstrap alone: its lower bound is the smallest ratio
    lo, hi = interval(ratios)
    assert lo == t_interval(ratios)[0] < 1.0 < hi
    assert estimate(pairs_with(ratios), Rule()).verdict == NOT_WORSE
    assert estimate(pairs_with([1.30, 1.32, 1.28]), Rule()).verdict == WINS  # a steady gain still wins


def test_ties_rarely_win_with_few_rounds() -> None:
    """200 studies of a true tie (log-normal noise, 3 rounds): a win is a false positive; at 95% two-sided
    confidence about 2.5% of them may win. The bootstrap alone would let about 12.5% through."""
    wins = sum(estimate(pairs_with(noisy(1.0, 0.1, 3)), Rule()).verdict == WINS for _ in range(200))
    assert wins <= 15, f"seed {SEED}: {wins} of 200 ties won"


def test_is_winner_needs_a_win_and_no_bad_phase() -> None:
    assert is_winner({"prefill": WINS, "decode": NOT_WORSE}, ("prefill",))
    assert not is_winner({"prefill": WINS, "decode": WORSE}, ("prefill",))
    assert not is_winner({"prefill": WINS, "decode": NO_EVIDENCE}, ("prefill",))
    assert is_winner({"prefill": WINS, "decode": TRADED}, ("prefill", "decode"))
    assert not is_winner({"prefill": NOT_WORSE, "decode": WINS}, ("prefill",))  # wins only off-objective
    assert is_winner({"prefill": WINS, "decode": None}, ("prefill",))  # decode not measured
    assert not is_winner({"prefill": NOT_WORSE, "decode": NOT_WORSE}, ("prefill", "decode"))


# ---- the choice: confirm.summarize_round / choose_best / best_contexts on constructed rounds -------------
def _measure(prefill: float, decode: float) -> dict[str, Any]:
    return {"prefill": {"128": [prefill], "512": [prefill / 3]}, "decode": [decode]}


def make_round(cands: dict[str, tuple[list[float], list[float]]], rounds: int) -> tuple[dict, dict, list[dict]]:
    """A worker reply: per round D, C1, D, C2...; candidate `key` has per-round (prefill, decode) ratios."""
    default = {"key": "D", "knobs": DEFAULT_KNOBS, "trials": [0]}
    candidates = [{"key": k, "knobs": dict(DEFAULT_KNOBS, chunk_size=64 * (i + 1)), "trials": [i + 1], "why": []}
                  for i, k in enumerate(cands)]
    passed = {"passed": True, "rel_err": 1e-7}
    raw: dict[str, Any] = {"configs": {c["key"]: {"prefill": {"128": [], "512": []}, "decode": [], "fidelity": passed,
                                                  "error": None} for c in [default, *candidates]},
                           "pairs": [], "sequence": []}
    for r in range(rounds):
        for c in candidates:
            base_p, base_d = RNG.uniform(800, 1200), RNG.uniform(40, 60)
            rp, rd = cands[c["key"]][0][r], cands[c["key"]][1][r]
            d_m, c_m = _measure(base_p, base_d), _measure(base_p * rp, base_d * rd)
            raw["pairs"].append({"round": r, "key": c["key"], "default": d_m, "candidate": c_m})
            for key, m in (("D", d_m), (c["key"], c_m)):
                for n in ("128", "512"):
                    raw["configs"][key]["prefill"][n] += m["prefill"][n]
                raw["configs"][key]["decode"] += m["decode"]
    return raw, default, candidates


def choose(raw: dict, default: dict, candidates: list[dict], mode: str = "balanced",
           **rule: Any) -> tuple[dict, list[dict]]:
    summary = confirm.summarize_round(raw, default, candidates, [128, 512], rule=rule)
    chosen = confirm.choose_best(summary, [128, 512], mode)
    return chosen, confirm.best_contexts(summary, chosen, {}, mode)


def test_choose_best_takes_the_significant_winner_over_a_bigger_noisy_one() -> None:
    raw, d, c = make_round({"steady": ([1.3, 1.32, 1.28, 1.31], [1.0, 1.01, 0.99, 1.0]),
                            "noisy": ([4.0, 0.5, 3.5, 0.6], [1.0, 1.0, 1.0, 1.0]),
                            "tie": ([1.01, 0.99, 1.0, 1.0], [1.0, 1.0, 1.01, 0.99])}, rounds=4)
    chosen, contexts = choose(raw, d, c)
    assert {n: e["key"] for n, e in chosen.items()} == {"128": "steady", "512": "steady"}
    ctx = contexts[0]
    assert ctx["winner"] is True and ctx["reason"] is None and not ctx["is_default"]
    assert ctx["confirmation"]["prefill"]["verdict"] == WINS
    assert ctx["confirmation"]["decode"]["verdict"] == NOT_WORSE
    assert ctx["confirmation"]["prefill"]["low"] > 1.0
    assert ctx["metrics"]["speedup_prefill"] == pytest.approx(geometric_mean([1.3, 1.32, 1.28, 1.31]))


def test_no_winner_keeps_the_default_and_best_json_says_why() -> None:
    raw, d, c = make_round({"tie": ([1.02, 0.97, 1.01, 0.99], [1.0, 1.02, 0.98, 1.0])}, rounds=4)
    chosen, contexts = choose(raw, d, c)
    assert all(e["key"] == "D" and e["winner"] is False for e in chosen.values())
    best = build_best(contexts, {"device_name": "cpu", "model_id": "tiny", "model_config_hash": "h",
                                 "study_name": "s", "trial_number": 0, "mlflow_run_id": None})
    for ctx in best["contexts"]:
        assert ctx["winner"] is False and ctx["is_default"] is True and ctx["knobs"] == DEFAULT_KNOBS
        assert "95% confidence" in ctx["reason"] and "trial #1" in ctx["reason"]
        assert ctx["confirmation"]["of"] == "closest candidate" and ctx["confirmation"]["key"] == "tie"


def test_trade_off_needs_max_trade() -> None:
    # Wins prefill by ~1.5x in every round, loses ~10% of decode in every round.
    ratios = ([1.5, 1.52, 1.48, 1.5, 1.51], [0.9, 0.91, 0.89, 0.9, 0.9])
    raw, d, c = make_round({"trader": ratios}, rounds=5)
    chosen, contexts = choose(raw, d, c)
    assert {e["key"] for e in chosen.values()} == {"D"}
    assert contexts[0]["confirmation"]["decode"]["verdict"] == WORSE
    chosen, contexts = choose(raw, d, c, max_trade=0.2)
    assert {e["key"] for e in chosen.values()} == {"trader"}
    assert contexts[0]["confirmation"]["decode"]["verdict"] == TRADED and contexts[0]["winner"] is True
    # The same data in a prefill-only study: decode still may not be given up without max_trade.
    chosen, _ = choose(raw, d, c, mode="prefill")
    assert {e["key"] for e in chosen.values()} == {"D"}


def test_too_few_rounds_is_no_winner_with_that_reason() -> None:
    raw, d, c = make_round({"fast": ([2.0, 2.1], [2.0, 2.0])}, rounds=2)
    chosen, contexts = choose(raw, d, c)
    assert {e["key"] for e in chosen.values()} == {"D"}
    assert contexts[0]["reason"].startswith("not enough evidence: 2 paired round(s), at least 3 needed")


def test_a_winner_that_failed_fidelity_is_not_chosen() -> None:
    raw, d, c = make_round({"fast": ([2.0, 2.1, 2.0], [2.0, 2.0, 2.1])}, rounds=3)
    raw["configs"]["fast"]["fidelity"] = {"passed": False, "rel_err": 0.3}
    chosen, contexts = choose(raw, d, c)
    assert {e["key"] for e in chosen.values()} == {"D"}
    assert contexts[0]["reason"] == "no candidate passed the fidelity check in the confirmation round"


def test_replayed_figures_are_no_evidence() -> None:
    recs = {"D": {"prefill_tok_s_ctx128": 100.0, "prefill_tok_s_ctx512": 50.0, "decode_tok_s": 10.0,
                  "fidelity_passed": True},
            "F": {"prefill_tok_s_ctx128": 300.0, "prefill_tok_s_ctx512": 150.0, "decode_tok_s": 30.0,
                  "fidelity_passed": True}}
    default = {"key": "D", "knobs": DEFAULT_KNOBS, "trials": [0]}
    cand = [{"key": "F", "knobs": dict(DEFAULT_KNOBS, chunk_size=64), "trials": [3], "why": []}]
    summary = confirm.replay_round(recs, default, cand, [128, 512])
    chosen = confirm.choose_best(summary, [128, 512], "balanced")
    assert {e["key"] for e in chosen.values()} == {"D"}
    assert summary["configs"][1]["speedup_prefill"]["128"] == pytest.approx(3.0)
    assert summary["configs"][1]["paired"]["decode"]["verdict"] == NO_EVIDENCE


def test_signature_changes_with_the_rule() -> None:
    a = confirm.signature("D", [{"key": "X"}], 3, 1, rule={"confidence": 0.95})
    assert a == confirm.signature("D", [{"key": "X"}], 3, 1)
    assert a != confirm.signature("D", [{"key": "X"}], 3, 1, rule={"max_trade": 0.1})
    assert a != confirm.signature("D", [{"key": "X"}], 3, 1, rule={"confidence": 0.9})


def test_build_best_rejects_an_inconsistent_no_winner_entry() -> None:
    prov = {"device_name": "cpu", "model_id": "tiny", "model_config_hash": "h", "study_name": "s",
            "trial_number": 0, "mlflow_run_id": None}
    base = {"context_len": 128, "knobs": DEFAULT_KNOBS, "metrics": {}, "fidelity": {"passed": True}}
    with pytest.raises(UserError, match="needs a non-empty reason"):
        build_best([dict(base, winner=False, is_default=True, reason="")], prov)
    with pytest.raises(UserError, match="keeps the default"):
        build_best([dict(base, winner=False, is_default=False, reason="tie")], prov)
    with pytest.raises(UserError, match="winner must be true or false"):
        build_best([dict(base, winner="no")], prov)
    assert build_best([dict(base, winner=False, is_default=True, reason="tie")], prov)["contexts"][0]["winner"] is False


# ---- the spec keys -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("confidence", 1.0, "confidence must be in 0.5..1"),
    ("confidence", 0.2, "confidence must be in 0.5..1"),
    ("max_trade", -0.1, "max_trade is the fraction"),
    ("max_trade", 1.5, "max_trade is the fraction"),
    ("min_rounds", 1, "min_rounds must be >= 2"),
])
def test_spec_rejects_bad_rule_settings(key: str, value: Any, message: str) -> None:
    from xlstm_tune.study.spec import parse_spec

    with pytest.raises(UserError, match=message):
        parse_spec({"study": {"name": "x"}, "confirm": {key: value}, "space": {"chunk_size": [16, 32]}})
    spec = parse_spec({"study": {"name": "x"}, "confirm": {"max_trade": 0.1}, "space": {"chunk_size": [16, 32]}})
    assert Rule.from_mapping(spec.confirm) == Rule(confidence=0.95, max_trade=0.1, min_rounds=3)


# ---- the worker's pairing, on the real tiny model ---------------------------------------------------------
def test_worker_pairs_each_candidate_with_the_default_measured_right_before_it(tmp_path: Path) -> None:
    from xlstm_tune.study.worker import _Session

    session = _Session({
        "model": "tiny", "device": "cpu", "dtype": "float32", "compile": False,
        "bench": {"warmup": 0, "repeats": 1, "max_cv": 1e9, "max_rounds": 1},
        "context_lens": [16, 32], "new_tokens": 2,
        "fidelity": {"rel_tol": 1e-4, "min_greedy_agreement": None, "prompt_len": 16, "decode_steps": 1},
        "reference_path": str(tmp_path / "reference.pt"), "outputs_dir": str(tmp_path / "outputs"),
    })
    configs = [{"key": "D", "knobs": DEFAULT_KNOBS}, {"key": "A", "knobs": dict(DEFAULT_KNOBS, chunk_size=16)},
               {"key": "B", "knobs": dict(DEFAULT_KNOBS, backend="native")}]
    reply = session.confirm({"configs": configs, "rounds": 2, "repeats": 2})
    # Each round starts with the default, then the candidates in rotating order; the default is measured
    # again before the second candidate only where that is cheap (remeasure_default, on measured times).
    seq = reply["sequence"]
    assert [c for c in seq if c != "D"] == ["A", "B", "B", "A"]  # the candidate order rotates
    assert seq[0] == "D" and seq[seq.index("B") + 1] == "D" and 2 <= seq.count("D") <= 4
    pairs = reply["pairs"]
    assert [(p["round"], p["key"]) for p in pairs] == [(0, "A"), (0, "B"), (1, "B"), (1, "A")]
    # Each pair holds the default's latest measurement before the candidate's (2 repeats per measurement).
    pooled_d = reply["configs"]["D"]["prefill"]["16"]
    latest, n_d = [], 0
    for key in seq:
        n_d += key == "D"
        if key != "D":
            latest.append(pooled_d[2 * (n_d - 1):2 * n_d])
    assert [p["default"]["prefill"]["16"] for p in pairs] == latest
    for key in ("A", "B"):
        pooled = [s for p in pairs if p["key"] == key for s in p["candidate"]["decode"]]
        assert pooled == reply["configs"][key]["decode"]
    assert all(len(p["candidate"]["prefill"]["32"]) == 2 and len(p["default"]["decode"]) == 2 for p in pairs)
    summary = confirm.summarize_round(reply, {"key": "D", "knobs": DEFAULT_KNOBS}, configs[1:], [16, 32])
    assert summary["paired_rounds"] == 2
    for e in summary["configs"][1:]:  # two rounds are below min_rounds: measured, but no evidence yet
        assert e["paired"]["prefill"]["16"]["rounds"] == 2 and e["paired"]["decode"]["verdict"] == "not enough evidence"


@pytest.mark.parametrize("default_s, candidate_s, again", [
    ([], [], True),                 # nothing measured yet: pair tightly
    ([2.0], [], True),
    ([2.0], [3.0, 1.0, 2.5], True),   # the default costs no more than the candidate's median
    ([35.0], [3.0, 2.8, 3.1], False),  # a slow default: once per round
    ([1.0, 9.0], [4.0], False),      # its latest measurement decides
])
def test_the_default_is_remeasured_before_a_candidate_only_where_that_is_cheap(default_s, candidate_s, again) -> None:
    from xlstm_tune.study.worker import remeasure_default

    assert remeasure_default(default_s, candidate_s) is again


def test_terminal_summary_shows_intervals_verdicts_and_why_the_default_stays() -> None:
    from xlstm_tune.study.report import render

    raw, d, c = make_round({"steady": ([1.3, 1.32, 1.28, 1.31], [1.0, 1.01, 0.99, 1.0]),
                            "trader": ([1.5, 1.5, 1.5, 1.5], [0.8, 0.81, 0.79, 0.8])}, rounds=4)
    raw["pairs"] = [p for p in raw["pairs"] if p["key"] != "steady" or p["round"] < 2]  # 2 rounds: no evidence
    summary = confirm.summarize_round(raw, d, c, [128, 512])
    chosen = confirm.choose_best(summary, [128, 512], "balanced")
    contexts = confirm.best_contexts(summary, chosen, {}, "balanced")
    text = render({"study": "s", "records": [], "contexts": contexts, "default": summary["configs"][0],
                   "confirmation": summary, "paths": {}})
    assert text.count("default (no winner)") == 2
    assert "No winner at context 128: no candidate is faster than the default with 95% confidence" in text
    trader = next(ln for ln in text.splitlines() if ln.startswith("#2 "))
    est = summary["configs"][2]["paired"]
    assert "chunk_size=128" in trader and "backend=" not in trader  # only the knobs unlike the default
    assert f"{est['prefill']['128']['speedup']:.2f}x [{est['prefill']['128']['low']:.2f}-" in trader
    assert trader.count(" wins") == 2 and " worse" in trader
    steady = next(ln for ln in text.splitlines() if ln.startswith("#1 "))
    assert steady.count("not enough evidence") == 3
    assert "Default configuration: backend=queued chunk_size=32 heads_per_band=4 workers=1" in text
