"""Paired confirmation statistics: is a candidate really faster than the default, or is it noise?

The confirmation round measures the default right before every candidate (D, C1, D, C2, ... in each
round), so the two measurements of a pair share the machine's state of that moment. Per round and phase
the paired ratio is candidate / default (each side: the median of its repeats). Slow drift (heat,
background load) moves both sides of a pair alike and cancels in the ratio; what is left is the noise
the interval has to cover.

Statistic: the geometric mean of the per-round ratios (a mean of log ratios: a 2x gain and a 2x loss
cancel). Interval, at the `confidence` level (two-sided): the wider envelope of a percentile bootstrap
over rounds (fixed seed: the same measurements always give the same verdict; it follows skewed noise)
and Student's t interval of the mean log ratio. The bootstrap alone is too narrow with few rounds: with
3 rounds its lower bound is the smallest ratio, so three rounds that all land above 1 by chance (1 in 8
for a tie) would "win"; the t interval keeps the stated confidence there.

Verdict of one phase (`max_trade` is the fraction of a phase the spec lets a winner give up):

    not enough evidence   fewer than `min_rounds` paired rounds
    wins                  interval lower bound > 1           (faster with confidence)
    not worse             upper bound >= 1                   (no significant loss)
    traded                significant loss, but lower bound >= 1 - max_trade   (only when max_trade > 0)
    worse                 anything else                      (significantly slower beyond the allowance)

A candidate is a winner when it wins on at least one of the phases it is chosen for and no measured
phase is `worse` or lacks evidence. The confidence is per candidate and phase (no correction for
confirming several candidates). Pure functions, no torch: unit-testable on constructed data.
"""
from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

WINS, NOT_WORSE, TRADED, WORSE, NO_EVIDENCE = "wins", "not worse", "traded", "worse", "not enough evidence"
ACCEPTABLE = (WINS, NOT_WORSE, TRADED)
RESAMPLES = 4000
SEED = 0


@dataclass(frozen=True)
class Rule:
    """The decision rule's settings (spec `[confirm] confidence, max_trade, min_rounds`)."""

    confidence: float = 0.95
    max_trade: float = 0.0
    min_rounds: int = 3

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any] | None) -> Rule:
        m = m or {}
        d = cls()
        return cls(confidence=float(m.get("confidence", d.confidence)),
                   max_trade=float(m.get("max_trade", d.max_trade)),
                   min_rounds=int(m.get("min_rounds", d.min_rounds)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    """A phase's paired speed-up: geometric-mean ratio, its interval, the rounds behind it, the verdict."""

    speedup: float
    low: float
    high: float
    rounds: int
    verdict: str
    ratios: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"speedup": self.speedup, "low": self.low, "high": self.high, "rounds": self.rounds,
                "verdict": self.verdict, "ratios": list(self.ratios)}


def _value(samples: Any) -> float | None:
    """One measurement's figure: the median of its repeats (a bare number is taken as is)."""
    if isinstance(samples, (int, float)) and not isinstance(samples, bool):
        vals = [float(samples)]
    elif isinstance(samples, Sequence) and not isinstance(samples, str):
        vals = [float(v) for v in samples if isinstance(v, (int, float)) and not isinstance(v, bool)]
    else:
        return None
    vals = [v for v in vals if math.isfinite(v)]
    return statistics.median(vals) if vals else None


def paired_ratios(pairs: Sequence[tuple[Any, Any]]) -> list[float]:
    """candidate / default per pair of (default measurement, candidate measurement); unusable pairs dropped."""
    out = []
    for d, c in pairs:
        dv, cv = _value(d), _value(c)
        if dv is not None and cv is not None and dv > 0 and cv > 0:
            out.append(cv / dv)
    return out


def geometric_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bootstrap_interval(ratios: Sequence[float], confidence: float = 0.95, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the geometric-mean ratio (rounds resampled with replacement)."""
    if not ratios:
        raise ValueError("no ratios")
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    if n == 1:
        return ratios[0], ratios[0]
    draws = random.Random(seed).choices(logs, k=n * resamples)
    means = sorted(math.fsum(draws[i:i + n]) / n for i in range(0, n * resamples, n))
    alpha = (1.0 - confidence) / 2.0
    lo = means[max(0, math.floor(alpha * resamples))]
    hi = means[min(resamples - 1, math.ceil((1.0 - alpha) * resamples) - 1)]
    return math.exp(lo), math.exp(hi)


def t_interval(ratios: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student's t interval of the mean log ratio, as ratios (exact for log-normal noise, any n >= 2)."""
    from scipy.stats import t

    logs = [math.log(r) for r in ratios]
    n = len(logs)
    if n < 2:
        return ratios[0], ratios[0]
    half = float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * statistics.stdev(logs) / math.sqrt(n)
    mean = statistics.fmean(logs)
    return math.exp(mean - half), math.exp(mean + half)


def interval(ratios: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The interval the verdicts use: the envelope of the bootstrap and t intervals (module docstring)."""
    b_lo, b_hi = bootstrap_interval(ratios, confidence)
    t_lo, t_hi = t_interval(ratios, confidence)
    return min(b_lo, t_lo), max(b_hi, t_hi)


def verdict(low: float, high: float, rounds: int, rule: Rule) -> str:
    """One phase's verdict (see the module docstring)."""
    if rounds < rule.min_rounds:
        return NO_EVIDENCE
    if low > 1.0:
        return WINS
    if high >= 1.0:
        return NOT_WORSE
    if rule.max_trade > 0 and low >= 1.0 - rule.max_trade:
        return TRADED
    return WORSE


def estimate(pairs: Sequence[tuple[Any, Any]], rule: Rule) -> Estimate | None:
    """The paired speed-up of one phase from its (default, candidate) measurements; None without any pair."""
    ratios = paired_ratios(pairs)
    if not ratios:
        return None
    low, high = interval(ratios, rule.confidence)
    point = geometric_mean(ratios)
    return Estimate(point, low, high, len(ratios), verdict(low, high, len(ratios), rule), tuple(ratios))


def is_winner(verdicts: Mapping[str, str | None], chosen_for: Sequence[str]) -> bool:
    """Wins on one of the `chosen_for` phases, and every measured phase is acceptable.

    `verdicts`: phase -> verdict, None for a phase that was not measured (it cannot disqualify).
    A phase in `chosen_for` without a verdict cannot be won.
    """
    measured = {p: v for p, v in verdicts.items() if v is not None}
    if any(v not in ACCEPTABLE for v in measured.values()):
        return False
    return any(measured.get(p) == WINS for p in chosen_for)


def fmt_interval(est: Mapping[str, Any] | None) -> str:
    """`1.84x [1.62-2.10]` (terminal, report.md and export print the same form)."""
    if not est or est.get("speedup") is None:
        return "-"
    if est.get("low") is None or est.get("high") is None:
        return f"{est['speedup']:.2f}x [unpaired]"
    return f"{est['speedup']:.2f}x [{est['low']:.2f}-{est['high']:.2f}]"
