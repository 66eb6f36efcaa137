"""How busy the machine was while a figure was measured.

A figure taken while other processes compete for the CPUs this process runs on is not the
configuration's speed (on a busy 2-core machine a prefill took 1.3-12 s with two threads and 21-81 ms
with one). So every measurement is bracketed by a `LoadProbe`, which records:

* `other_cpu_s`: CPU time spent by everything else on our CPUs during the measurement: the busy time
  of the CPUs in this process's affinity mask (psutil) minus the CPU time of this process and its
  children (what the measurement itself used);
* `other_cpu_frac`: that time as a fraction of what those CPUs could give in the same wall time;
* `loadavg_1m` and, on CUDA, the GPU's utilisation, clocks, temperature and power where NVML can be read.

`busy` is `other_cpu_frac > max_other_cpu` (beyond the counters' error, below). The harness re-measures a busy figure (a bounded number of
times) and flags it `busy_machine` when the load persists; under an overload that a re-measurement cannot
outwait (load average above PERSISTENT_LOAD_PER_CPU per CPU) it flags at once. The study summary warns
about flagged figures.
CPU counters tick (10 ms on Linux), so over a short measurement `other_cpu_s` is off by up to a tick per
CPU (and one for our own process): `busy` asks for more than `max_other_cpu` beyond that error
(`is_busy`), so that a one-call screen on an idle machine is not called busy by rounding, and a
measurement much shorter than a tick reads as idle.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

DEFAULT_MAX_OTHER_CPU = 0.25  # other processes may use up to a quarter of our CPUs before a figure is "busy"
# A 1-minute load average above this many runnable tasks per CPU is an overload that outlasts any
# re-measurement: the figure is flagged at once instead of being measured again for nothing.
PERSISTENT_LOAD_PER_CPU = 2.0


try:
    CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    CLOCK_TICK_S = 0.01


def is_busy(other_cpu_s: float, wall_s: float, cpus: int, max_other_cpu: float,
            tick_s: float = CLOCK_TICK_S) -> bool:
    """Other processes took more than `max_other_cpu` of `cpus` CPUs over `wall_s`, beyond the error of
    the CPU counters (a tick per CPU, one for our own process)."""
    return other_cpu_s - (cpus + 1) * tick_s > max_other_cpu * wall_s * cpus


def _affinity() -> list[int]:
    try:
        return sorted(psutil.Process().cpu_affinity())
    except (AttributeError, NotImplementedError, psutil.Error, OSError):
        return list(range(psutil.cpu_count() or 1))


def _busy_seconds(cpus: list[int]) -> float:
    """Busy (non-idle) seconds since boot summed over `cpus`."""
    per_cpu = psutil.cpu_times(percpu=True)
    total = 0.0
    for i in cpus:
        if i >= len(per_cpu):
            continue
        t = per_cpu[i]
        idle = t.idle + getattr(t, "iowait", 0.0)
        total += sum(t) - idle - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    return total


def _tree_seconds(proc: psutil.Process) -> float:
    """CPU seconds of `proc`, its reaped children and its live descendants."""
    def own(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    try:
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0
    for child in proc.children(recursive=True):
        try:
            total += own(child)
        except psutil.Error:
            continue
    return total


@dataclass(frozen=True)
class LoadSample:
    """The machine's load during one measurement (see the module docstring)."""

    wall_s: float
    cpus: int
    own_cpu_s: float
    other_cpu_s: float
    other_cpu_frac: float
    loadavg_1m: float | None
    busy: bool
    accelerator: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadProbe:
    """Context manager: `with LoadProbe(device) as probe: ...`, then `probe.sample`."""

    def __init__(self, device: Any = None, max_other_cpu: float = DEFAULT_MAX_OTHER_CPU,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self.max_other_cpu = float(max_other_cpu)
        self.clock = clock
        self.sample: LoadSample | None = None
        self._proc = psutil.Process()

    def __enter__(self) -> "LoadProbe":
        self._cpus = _affinity()
        self._t0 = self.clock()
        self._busy0 = _busy_seconds(self._cpus)
        self._own0 = _tree_seconds(self._proc)
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = max(self.clock() - self._t0, 1e-9)
        busy = _busy_seconds(self._cpus) - self._busy0
        own = _tree_seconds(self._proc) - self._own0
        other = max(0.0, busy - own)
        frac = other / (wall * len(self._cpus))
        try:
            loadavg: float | None = os.getloadavg()[0]
        except (AttributeError, OSError):
            loadavg = None
        accel: dict[str, Any] = {}
        if self.device is not None:
            from xlstm_tune.runtime.device import accelerator_load

            accel = accelerator_load(self.device)
        self.sample = LoadSample(wall_s=wall, cpus=len(self._cpus), own_cpu_s=own, other_cpu_s=other,
                                 other_cpu_frac=frac, loadavg_1m=loadavg,
                                 busy=is_busy(other, wall, len(self._cpus), self.max_other_cpu),
                                 accelerator=accel)


def measure_unloaded(run: Callable[[], Any], *, device: Any = None, max_other_cpu: float = DEFAULT_MAX_OTHER_CPU,
                     retries: int = 1, persistent_load_per_cpu: float | None = PERSISTENT_LOAD_PER_CPU,
                     ) -> tuple[Any, LoadSample, int]:
    """`run()` under a LoadProbe, again (up to `retries` more times) while the machine was busy, unless
    the load average says the overload persists (`persistent_load_per_cpu`; None: always retry).

    Returns (the last result, its load sample, how many attempts were made). The caller flags the
    result `busy_machine` when the sample is still busy.
    """
    attempts = 0
    while True:
        attempts += 1
        with LoadProbe(device, max_other_cpu) as probe:
            result = run()
        assert probe.sample is not None
        sample = probe.sample
        # the load average counts the whole machine's runnable tasks: compare with all its CPUs
        persistent = (persistent_load_per_cpu is not None and sample.loadavg_1m is not None
                      and sample.loadavg_1m > persistent_load_per_cpu * (psutil.cpu_count() or sample.cpus))
        if not sample.busy or attempts > retries or persistent:
            return result, sample, attempts
