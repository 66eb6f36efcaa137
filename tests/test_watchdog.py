"""The memory watchdog against real allocations on the CPU (process RSS), no mocks.

Each test allocates ~300 MB with every page touched and puts a threshold 150 MB above the RSS measured
just before, so the crossing is unambiguous. Torch allocations this large are mmap-backed and go back to
the OS on free (glibc); `_free` also calls malloc_trim in case a build keeps them. Waits use generous
deadlines and poll counters, never timing thresholds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import pickle
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from xlstm_tune.errors import MemoryAbort, UserError
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.watchdog import LOG_COLUMNS, MemoryWatchdog, WatchdogConfig, checkpoint

BIG = 300 * 2**20 // 4  # float32 elements in ~300 MB
MARGIN_MB = 150.0
POLL_MS = 10


def _rss_mb() -> float:
    return dev.memory_stats("cpu")["process_rss_mb"]


def _free() -> None:
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        libc = ctypes.CDLL(libc_name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.005)


def _wait_polls(wd: MemoryWatchdog, n: int) -> None:
    target = wd.polls + n
    _wait_for(lambda: wd.polls >= target, f"{n} more watchdog polls")


def _big() -> torch.Tensor:
    blob = torch.ones(BIG)  # ones() writes every page, so RSS really grows
    assert float(blob[-1]) == 1.0
    return blob


@pytest.fixture
def baseline_mb() -> float:
    _free()
    return _rss_mb()


# ---- soft threshold ---------------------------------------------------------------------------------
def test_soft_fires_once_per_crossing(baseline_mb: float, caplog: pytest.LogCaptureFixture) -> None:
    limit = baseline_mb + MARGIN_MB
    config = WatchdogConfig(soft_mb=limit, poll_ms=POLL_MS, actions=("warn", "empty_cache"))
    caplog.set_level(logging.WARNING, logger="xlstm_tune.watchdog")
    with MemoryWatchdog(config, "cpu") as wd:
        _wait_polls(wd, 2)
        assert wd.soft_events == 0

        blob = _big()
        _wait_for(lambda: wd.soft_events >= 1, "the first soft event")
        _wait_polls(wd, 10)  # stays above for many polls: still one event
        assert wd.soft_events == 1

        del blob
        _free()
        _wait_for(lambda: wd.last_stats["watched_used_mb"] < limit, "RSS to fall below the soft limit")
        assert wd.soft_events == 1

        blob = _big()
        _wait_for(lambda: wd.soft_events >= 2, "the second soft event (re-armed)")
        _wait_polls(wd, 10)
        assert wd.soft_events == 2
        del blob
        _free()
    assert not wd.running
    assert wd.hard_events == 0 and not wd.aborted
    assert wd.peak_used_mb >= limit
    assert [e.kind for e in wd.events] == ["soft", "soft"]
    wd.check()  # soft events never abort

    warnings = [r for r in caplog.records if r.name == "xlstm_tune.watchdog"]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # "warn" ran once per crossing
    for record in warnings:
        text = record.getMessage()
        assert "soft limit" in text and "XLSTM_MEM_SOFT_MB" in text and "\n" not in text
    # The empty_cache action ran on CPU without failing (a failure would log a second kind of line).
    assert not any("failed" in r.getMessage() for r in warnings)


def test_soft_pct_threshold(baseline_mb: float) -> None:
    total = dev.memory_stats("cpu")["watched_total_mb"]
    pct = (baseline_mb + MARGIN_MB) / total * 100
    config = WatchdogConfig(soft_pct=pct, poll_ms=POLL_MS, actions=())
    with MemoryWatchdog(config, "cpu") as wd:
        blob = _big()
        _wait_for(lambda: wd.soft_events >= 1, "a soft event from the % threshold")
        del blob
        _free()
    assert "XLSTM_MEM_SOFT_PCT" in wd.events[0].message


# ---- hard threshold ---------------------------------------------------------------------------------
def test_hard_interrupts_a_pure_python_loop(baseline_mb: float) -> None:
    limit = baseline_mb + MARGIN_MB
    wd = MemoryWatchdog(WatchdogConfig(hard_mb=limit, poll_ms=POLL_MS), "cpu")
    deadline = time.monotonic() + 20
    blob = None
    with pytest.raises(MemoryAbort) as info:
        with wd:
            blob = _big()
            while time.monotonic() < deadline:  # spins forever unless interrupted
                time.sleep(0.001)
    interrupted_in_time = time.monotonic() < deadline
    del blob
    _free()

    assert interrupted_in_time, "the loop ran to its deadline: MemoryAbort was not injected"
    message = str(info.value)
    assert message.startswith("memory watchdog")
    assert "hard limit" in message and "XLSTM_MEM_HARD_MB / --mem-hard-mb" in message and "\n" not in message
    assert not wd.running  # the thread was joined on the way out
    assert wd.hard_events == 1 and wd.aborted and wd.soft_events == 0
    with pytest.raises(MemoryAbort, match="hard limit"):
        wd.check()
    checkpoint()  # the watchdog is stopped: nothing active is left to abort

    # A worker process sends the exception back pickled: it must arrive as a plain MemoryAbort.
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is MemoryAbort and str(clone) == message


def test_with_block_ends_in_abort_even_if_the_injection_is_swallowed(baseline_mb: float) -> None:
    wd = MemoryWatchdog(WatchdogConfig(hard_mb=baseline_mb + MARGIN_MB, poll_ms=POLL_MS), "cpu")
    swallowed = False
    deadline = time.monotonic() + 20
    with pytest.raises(MemoryAbort):
        with wd:
            blob = None
            try:
                blob = _big()
                while time.monotonic() < deadline:
                    time.sleep(0.001)
            except MemoryAbort:
                swallowed = True
            del blob
    _free()
    assert swallowed
    assert not wd.running


def test_cooperative_checkpoint_without_injection(baseline_mb: float) -> None:
    config = WatchdogConfig(hard_mb=baseline_mb + MARGIN_MB, poll_ms=POLL_MS)
    wd = MemoryWatchdog(config, "cpu", interrupt=False).start()
    try:
        checkpoint()  # below the limit: nothing happens
        blob = _big()
        _wait_for(lambda: wd.aborted, "the hard event")  # no exception injected into this loop
        with pytest.raises(MemoryAbort, match="XLSTM_MEM_HARD_MB"):
            checkpoint()
        with pytest.raises(MemoryAbort):
            wd.check()
        del blob
        _free()
    finally:
        wd.stop()
    assert not wd.running and wd.hard_events == 1
    with pytest.raises(MemoryAbort):
        wd.check()  # still reported after stop()


# ---- log, lifecycle, disabled -----------------------------------------------------------------------
def test_csv_log_is_complete_line_by_line(baseline_mb: float, tmp_path: Path) -> None:
    log = tmp_path / "sub" / "mem.csv"
    config = WatchdogConfig(soft_mb=baseline_mb + MARGIN_MB, poll_ms=POLL_MS, actions=(), log_path=log)
    with MemoryWatchdog(config, "cpu") as wd:
        _wait_polls(wd, 3)
        live = log.read_text()  # flushed while running, whole lines only
        assert live.endswith("\n") and live.count("\n") >= 4
        blob = _big()
        _wait_for(lambda: wd.soft_events >= 1, "the soft event")
        del blob
        _free()
    lines = log.read_text().splitlines()
    assert lines[0] == ",".join(LOG_COLUMNS)
    rows = [line.split(",") for line in lines[1:]]
    assert len(rows) == wd.polls
    assert all(len(row) == len(LOG_COLUMNS) for row in rows)
    assert [row[-1] for row in rows].count("soft") == 1
    assert {row[-1] for row in rows} <= {"", "soft"}
    for row in rows:
        time_s, used, total, pct, rss = map(float, row[:5])
        assert time_s >= 0 and 0 < used <= total and 0 < pct <= 100 and rss > 0


def test_disabled_watchdog_does_nothing() -> None:
    wd = MemoryWatchdog(WatchdogConfig(enabled=False, hard_mb=1.0), "cpu")
    with wd:
        assert not wd.running
        checkpoint()
    assert wd.polls == 0 and wd.hard_events == 0
    wd.check()


def test_watchdog_restarts_and_refuses_double_start() -> None:
    wd = MemoryWatchdog(WatchdogConfig(poll_ms=POLL_MS), "cpu").start()
    try:
        with pytest.raises(RuntimeError):
            wd.start()
        _wait_polls(wd, 1)
    finally:
        wd.stop()
    assert not wd.running
    wd.stop()  # idempotent
    with wd:
        assert wd.running
    assert not wd.running and wd.peak_used_mb > 0


# ---- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"soft_pct": 0},
        {"hard_pct": 100.5},
        {"soft_pct": -5},
        {"soft_pct": 95, "hard_pct": 90},
        {"soft_pct": 90, "hard_pct": 90},
        {"soft_mb": 5000, "hard_mb": 4000},
        {"hard_mb": 0},
        {"soft_mb": "lots"},
        {"actions": ("warn", "explode")},
        {"actions": "warn,explode"},
        {"poll_ms": 0},
        {"poll_ms": 2.5},
        {"enabled": "maybe"},
    ],
)
def test_bad_config_is_a_one_line_user_error(kwargs: dict) -> None:
    with pytest.raises(UserError) as info:
        WatchdogConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_normalises_actions() -> None:
    assert WatchdogConfig(actions="warn, empty_cache,warn").actions == ("warn", "empty_cache")
    assert WatchdogConfig(actions="none").actions == ()
    assert WatchdogConfig(soft_pct="80", hard_pct=95).soft_pct == 80.0


def test_from_env_reads_every_variable(tmp_path: Path) -> None:
    env = {
        "XLSTM_MEM_WATCHDOG": "1",
        "XLSTM_MEM_SOFT_PCT": "80",
        "XLSTM_MEM_HARD_PCT": "95.5",
        "XLSTM_MEM_SOFT_MB": "1000",
        "XLSTM_MEM_HARD_MB": "2000",
        "XLSTM_MEM_POLL_MS": "50",
        "XLSTM_MEM_ACTION": "empty_cache",
        "UNRELATED": "x",
    }
    config = WatchdogConfig.from_env(env)
    assert config == WatchdogConfig(
        enabled=True, soft_pct=80, hard_pct=95.5, soft_mb=1000, hard_mb=2000, poll_ms=50, actions=("empty_cache",)
    )
    assert WatchdogConfig.from_env({"XLSTM_MEM_WATCHDOG": "0"}).enabled is False
    assert WatchdogConfig.from_env({}) == WatchdogConfig()
    assert WatchdogConfig.from_env({"XLSTM_MEM_SOFT_MB": " "}).soft_mb is None  # empty = unset
    assert WatchdogConfig.from_env(env, hard_mb=3000, log_path=tmp_path / "m.csv").hard_mb == 3000


@pytest.mark.parametrize(
    "var, value",
    [
        ("XLSTM_MEM_WATCHDOG", "maybe"),
        ("XLSTM_MEM_SOFT_PCT", "lots"),
        ("XLSTM_MEM_HARD_PCT", "150"),
        ("XLSTM_MEM_SOFT_MB", "-1"),
        ("XLSTM_MEM_HARD_MB", "nan"),
        ("XLSTM_MEM_POLL_MS", "fast"),
        ("XLSTM_MEM_POLL_MS", "0"),
        ("XLSTM_MEM_ACTION", "warn,reboot"),
    ],
)
def test_bad_env_var_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(UserError) as info:
        WatchdogConfig.from_env({var: value})
    message = str(info.value)
    assert var in message and "\n" not in message


def test_env_soft_above_hard_names_a_variable() -> None:
    with pytest.raises(UserError, match="XLSTM_MEM_SOFT_PCT"):
        WatchdogConfig.from_env({"XLSTM_MEM_SOFT_PCT": "95", "XLSTM_MEM_HARD_PCT": "90"})


# ---- CUDA (reserved memory of the caching allocator); skipped on CPU-only machines -------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_watchdog_soft_then_hard_on_reserved_memory() -> None:
    cuda = dev.resolve_device("cuda")
    dev.empty_cache(cuda)
    base = dev.memory_stats(cuda)["watched_used_mb"]
    config = WatchdogConfig(soft_mb=base + MARGIN_MB, hard_mb=base + 3 * MARGIN_MB, poll_ms=POLL_MS)
    wd = MemoryWatchdog(config, cuda)
    blobs: list[torch.Tensor] = []
    deadline = time.monotonic() + 20
    with pytest.raises(MemoryAbort, match="CUDA reserved .* hard limit") as info:
        with wd:
            blobs.append(torch.ones(BIG, device=cuda))  # ~300 MB: soft only
            _wait_for(lambda: wd.soft_events >= 1, "the soft event on CUDA")
            _wait_polls(wd, 5)
            assert wd.hard_events == 0
            blobs.append(torch.ones(BIG, device=cuda))  # ~600 MB: past hard
            while time.monotonic() < deadline:
                time.sleep(0.001)
    interrupted_in_time = time.monotonic() < deadline
    blobs.clear()
    dev.empty_cache(cuda)
    assert interrupted_in_time
    assert "XLSTM_MEM_HARD_MB" in str(info.value)
    assert wd.soft_events == 1 and wd.hard_events == 1 and not wd.running
