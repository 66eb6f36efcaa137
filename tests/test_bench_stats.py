"""bench.stats and bench.timing: statistics by hand, sync before every clock read, re-measuring noise."""
from __future__ import annotations

import math
import statistics
import time

import pytest

from xlstm_tune.bench.stats import Summary, percentile, summarize
from xlstm_tune.bench.timing import Measurement, measure, no_sync, throughput, time_first_call


def test_percentiles_hand_checked() -> None:
    # 5 values: position (n-1)*q = 4*q -> p20 at 0.8, p50 at 2, p80 at 3.2
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s.median == 3.0
    assert s.p20 == pytest.approx(1.8)   # 1 + 0.8 * (2 - 1)
    assert s.p80 == pytest.approx(4.2)   # 4 + 0.2 * (5 - 4)
    assert s.mean == 3.0
    assert s.stdev == pytest.approx(math.sqrt(2.5))
    assert s.cv == pytest.approx(math.sqrt(2.5) / 3.0)
    assert s.n == 5
    assert s.samples == [5.0, 1.0, 4.0, 2.0, 3.0]  # raw order kept


def test_even_count_median_interpolates() -> None:
    s = summarize([10.0, 20.0, 30.0, 40.0])
    assert s.median == 25.0
    assert s.p20 == pytest.approx(16.0)  # pos 0.6
    assert s.p80 == pytest.approx(34.0)  # pos 2.4
    assert percentile([1.0, 2.0], 0) == 1.0 and percentile([1.0, 2.0], 100) == 2.0


def test_single_sample_has_zero_cv() -> None:
    s = summarize([0.25])
    assert (s.median, s.p20, s.p80, s.stdev, s.cv, s.n) == (0.25, 0.25, 0.25, 0.0, 0.0, 1)


def test_summarize_rejects_empty_and_nan() -> None:
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


def test_as_dict_columns() -> None:
    s = summarize([1.0, 2.0, 3.0])
    d = s.as_dict("prefill_tok_s")
    assert d == {
        "prefill_tok_s": 2.0,
        "prefill_tok_s_p20": pytest.approx(1.4),
        "prefill_tok_s_p80": pytest.approx(2.6),
        "prefill_tok_s_cv": pytest.approx(0.5),
        "prefill_tok_s_n": 3,
    }
    assert set(s.metric_dict()) >= {"median", "p20", "p80", "cv"}


class EventLog:
    """A fake device and clock that record the order of events (no mock library)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.t = 0.0

    def sync(self) -> None:
        self.events.append("S")

    def clock(self) -> float:
        self.events.append("C")
        self.t += 1.0
        return self.t

    def fn(self) -> None:
        self.events.append("F")


def test_measure_syncs_before_every_clock_read_and_warms_up() -> None:
    ev = EventLog()
    m = measure(ev.fn, sync=ev.sync, warmup=2, repeats=3, clock=ev.clock)
    # Warm-up: untimed calls, each followed by a barrier; then per timed call: S C F S C.
    assert "".join(ev.events) == "FS" * 2 + "SCFSC" * 3
    for i, e in enumerate(ev.events):
        if e == "C":
            assert ev.events[i - 1] == "S", "a clock read without a sync right before it"
    assert m.durations_s == [1.0, 1.0, 1.0]  # the fake clock advances 1 s per read
    assert m.rounds == 1 and not m.cv_high
    assert m.summary.n == 3


def test_time_first_call_syncs() -> None:
    ev = EventLog()
    assert time_first_call(ev.fn, ev.sync, clock=ev.clock) == 1.0
    assert "".join(ev.events) == "SCFSC"


class StepClock:
    """An injected clock that only moves when the timed function says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds


def test_measure_remeasures_when_cv_high() -> None:
    calls = {"n": 0}
    clock = StepClock()

    def alternating() -> None:  # 1 ms / 20 ms: CV far above 10 %
        calls["n"] += 1
        clock.spend(0.001 if calls["n"] % 2 else 0.020)

    syncs = {"n": 0}

    def sync() -> None:
        syncs["n"] += 1

    m = measure(alternating, sync=sync, warmup=1, repeats=4, max_cv=0.10, max_rounds=3, clock=clock)
    assert m.rounds == 3
    assert m.cv_high
    assert len(m.durations_s) == 12  # all rounds' samples kept
    assert sorted(set(round(d, 9) for d in m.durations_s)) == [0.001, 0.020]  # the clock's readings, exactly
    assert calls["n"] == 1 + 12
    assert syncs["n"] == 1 + 2 * 12
    assert m.summary.cv > 0.10
    assert m.summary.n == 12


def test_measure_stops_early_when_stable() -> None:
    clock = StepClock()
    m = measure(lambda: clock.spend(0.002), sync=no_sync, warmup=0, repeats=3, max_cv=10.0, max_rounds=3, clock=clock)
    assert m.rounds == 1 and not m.cv_high and m.durations_s == pytest.approx([0.002] * 3)


def test_throughput_is_median_of_rates() -> None:
    durations = [1.0, 2.0, 4.0, 8.0]
    m = Measurement(durations_s=durations, summary=summarize(durations), rounds=1, cv_high=False)
    tp = throughput(100, m)
    rates = sorted([100.0, 50.0, 25.0, 12.5])
    assert tp.median == pytest.approx(statistics.median(rates))  # 37.5
    assert tp.median != pytest.approx(100 / m.summary.median)     # not tokens / median duration (33.3)
    assert tp.p20 == pytest.approx(percentile(rates, 20))
    with pytest.raises(ValueError):
        throughput(0, m)
    assert isinstance(tp, Summary)


def test_measure_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        measure(lambda: None, sync=no_sync, repeats=0)
