"""Summary statistics for repeated measurements (docs/DESIGN.md §5).

We report the median with p20/p80 and the coefficient of variation, like llama-bench reports a mean with
± stddev: one number people can compare and a spread that says whether to trust it. Pure Python, so this
module costs nothing to import and works without torch or numpy.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted samples, linearly interpolated.

    Same definition as numpy's default ("linear"): position (n - 1) * q / 100 between order statistics,
    so p50 of an even count is the mean of the two middle values.
    """
    n = len(sorted_samples)
    if n == 0:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    pos = (n - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * frac)


@dataclass(frozen=True)
class Summary:
    """Median, spread and size of one set of samples.

    `cv` is stdev / mean (sample stdev, n - 1): the relative noise that decides whether to re-measure.
    `samples` keeps the raw values so a record can be re-analysed later.
    """

    median: float
    p20: float
    p80: float
    mean: float
    stdev: float
    cv: float
    n: int
    samples: list[float] = field(default_factory=list)

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        """Flat columns for trials.jsonl / summary.csv / MLflow metrics: `<prefix>` is the median."""
        return {
            prefix: self.median,
            f"{prefix}_p20": self.p20,
            f"{prefix}_p80": self.p80,
            f"{prefix}_cv": self.cv,
            f"{prefix}_n": self.n,
        }

    def metric_dict(self) -> dict[str, Any]:
        """Nested form used in best.json's `metrics` (median, p20, p80, cv plus mean, stdev, n)."""
        return {
            "median": self.median,
            "p20": self.p20,
            "p80": self.p80,
            "cv": self.cv,
            "mean": self.mean,
            "stdev": self.stdev,
            "n": self.n,
        }


def summarize(samples: Sequence[float]) -> Summary:
    """Summarise samples; needs at least one finite value (n = 1 gives stdev 0 and cv 0)."""
    values = [float(s) for s in samples]
    if not values:
        raise ValueError("summarize() needs at least one sample")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"summarize() got non-finite sample(s) {bad[:3]}")
    ordered = sorted(values)
    mean = statistics.fmean(ordered)
    stdev = statistics.stdev(ordered) if len(ordered) > 1 else 0.0
    if stdev == 0.0:
        cv = 0.0
    elif mean == 0.0:
        cv = math.inf  # spread around zero: never "stable enough"
    else:
        cv = stdev / abs(mean)
    return Summary(
        median=percentile(ordered, 50.0),
        p20=percentile(ordered, 20.0),
        p80=percentile(ordered, 80.0),
        mean=mean,
        stdev=stdev,
        cv=cv,
        n=len(ordered),
        samples=values,
    )
