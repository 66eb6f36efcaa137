"""Wall-clock measurement with device synchronisation (docs/DESIGN.md §5).

Accelerators run asynchronously: reading a clock while kernels are still queued measures the launch, not
the work (one of the seed system's defects). So every clock read here is preceded by `sync()`, the
caller's device barrier (`torch.mps.synchronize`, `torch.cuda.synchronize`, or a no-op on CPU). This
module never imports torch: the caller passes the barrier, which keeps bench/ testable without a device.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xlstm_tune.bench.stats import Summary, summarize

Clock = Callable[[], float]


def no_sync() -> None:
    """The barrier for CPU work: nothing is queued, so nothing to wait for."""


@dataclass(frozen=True)
class Measurement:
    """Durations of the timed calls (seconds) and their summary.

    rounds: how many rounds of `repeats` calls were measured (more than 1 when the CV was high).
    cv_high: the CV still exceeded `max_cv` after the last round: the figure is noisy, say so.
    """

    durations_s: list[float]
    summary: Summary
    rounds: int
    cv_high: bool

    def as_dict(self, prefix: str) -> dict[str, Any]:
        """Flat columns: the duration summary plus `<prefix>_rounds` and `<prefix>_cv_high`."""
        out: dict[str, Any] = dict(self.summary.as_dict(prefix))
        out[f"{prefix}_rounds"] = self.rounds
        out[f"{prefix}_cv_high"] = self.cv_high
        return out


def _timed_call(fn: Callable[[], Any], sync: Callable[[], None], clock: Clock,
                before: Callable[[], None] | None = None) -> float:
    # `before` (e.g. announcing the call) runs outside the timed interval.
    if before is not None:
        before()
    # Barrier before each clock read: the first drains work queued before us, the second waits for ours.
    sync()
    start = clock()
    fn()
    sync()
    return clock() - start


def time_first_call(fn: Callable[[], Any], sync: Callable[[], None], *, clock: Clock = time.perf_counter,
                    before: Callable[[], None] | None = None) -> float:
    """Seconds taken by one call, meant for the first (compiling) call.

    Compilation is kept out of the steady-state figures by warm-up, but users pay it on every fresh
    process, so it is recorded on its own.
    """
    return _timed_call(fn, sync, clock, before)


def measure(
    fn: Callable[[], Any],
    *,
    sync: Callable[[], None],
    warmup: int = 1,
    repeats: int = 5,
    max_cv: float = 0.10,
    max_rounds: int = 3,
    clock: Clock = time.perf_counter,
    before: Callable[[], None] | None = None,
) -> Measurement:
    """Time `fn` after `warmup` untimed calls; re-measure while the CV of the durations exceeds `max_cv`.

    Each extra round adds `repeats` samples and all samples are kept (the median is robust to the noisy
    ones); after `max_rounds` rounds the measurement is returned with `cv_high=True` rather than looping
    forever on a busy machine. `clock` is injectable for tests; it defaults to `time.perf_counter`.
    `before()` runs ahead of every call, warm-up included, outside the timed interval.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
        sync()
    durations: list[float] = []
    rounds = 0
    summary: Summary | None = None
    while rounds < max_rounds:
        rounds += 1
        durations.extend(_timed_call(fn, sync, clock, before) for _ in range(repeats))
        summary = summarize(durations)
        if summary.cv <= max_cv:
            break
    assert summary is not None
    return Measurement(durations_s=durations, summary=summary, rounds=rounds, cv_high=summary.cv > max_cv)


def throughput(tokens: int, m: Measurement) -> Summary:
    """Tokens per second, one sample per timed call: the summary of `tokens / d` over the durations.

    We summarise the tok/s samples themselves rather than reporting `tokens / median(duration)`: for an
    odd count the medians agree (the map is monotonic), but p20/p80, mean and CV then describe the figure
    people actually read, and an even count's interpolated median is interpolated in tok/s.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    zero = [d for d in m.durations_s if d <= 0.0]
    if zero:
        raise ValueError("a timed call took no measurable time: time more tokens per call")
    return summarize([tokens / d for d in m.durations_s])
