"""Memory watchdog: a background thread that watches device memory while inference runs.

Compatible with the seed system (docs/DESIGN.md §4): configured by `XLSTM_MEM_*` variables or the CLI's `--mem-*`
flags. A soft threshold runs cheap relief actions (`warn`, `empty_cache`) once per crossing; a hard
threshold aborts the running work with `MemoryAbort` before unified/device memory is exhausted (on Apple
Silicon exhaustion freezes the whole machine, not just the process).

What is watched is `device.memory_stats(dev)["watched_used_mb"]` against `["watched_total_mb"]`: MPS
driver-allocated / recommended max, CUDA reserved / device total, CPU process RSS / system RAM (see
`device.memory_stats`). The watchdog never changes chunk sizes or any other runtime knob: a measurement
either runs with the knobs it was given or is aborted, so results stay canonical.

How a hard crossing aborts: the watchdog thread injects `MemoryAbort` into the thread that called
`start()` with `ctypes.pythonapi.PyThreadState_SetAsyncExc`, so a pure-Python loop is interrupted at its
next bytecode boundary. A thread blocked inside one long C call (a big torch op, a lock wait) sees it only
when that call returns. Worker threads are not interrupted; they (and the runtime between chunks) call
`checkpoint()`, which raises `MemoryAbort` once a hard crossing has happened.
"""
from __future__ import annotations

import csv
import ctypes
import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from xlstm_tune.errors import MemoryAbort, UserError
from xlstm_tune.runtime import device as devmod

logger = logging.getLogger("xlstm_tune.watchdog")

ACTIONS = ("warn", "empty_cache")
LOG_COLUMNS = ("time_s", "watched_used_mb", "watched_total_mb", "pct", "process_rss_mb", "event")

# Config field -> environment variable (the seed system's names).
ENV_VARS = {
    "enabled": "XLSTM_MEM_WATCHDOG",
    "soft_pct": "XLSTM_MEM_SOFT_PCT",
    "hard_pct": "XLSTM_MEM_HARD_PCT",
    "soft_mb": "XLSTM_MEM_SOFT_MB",
    "hard_mb": "XLSTM_MEM_HARD_MB",
    "poll_ms": "XLSTM_MEM_POLL_MS",
    "actions": "XLSTM_MEM_ACTION",
}
# Config field -> CLI flag, named in messages so users know how to change a limit.
_FLAGS = {
    "soft_pct": "--mem-soft-pct",
    "hard_pct": "--mem-hard-pct",
    "soft_mb": "--mem-soft-mb",
    "hard_mb": "--mem-hard-mb",
}


def _parse_actions(name: str, value: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise UserError(f"{name} must be a comma-separated string or a list of {', '.join(ACTIONS)}, got {value!r}")
    actions = tuple(str(a).strip().lower() for a in items if str(a).strip())
    if actions == ("none",):
        return ()
    unknown = [a for a in actions if a not in ACTIONS]
    if unknown:
        raise UserError(f"{name}: unknown watchdog action {unknown[0]!r}: use {', '.join(ACTIONS)} (comma-separated) or none")
    return tuple(dict.fromkeys(actions))  # keep order, drop repeats


def _parse_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        number = float(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class WatchdogConfig:
    """Thresholds and behaviour of the memory watchdog, validated on construction.

    enabled: run the watchdog at all (XLSTM_MEM_WATCHDOG=0 turns it off).
    soft_pct / soft_mb: soft threshold, as % of watched total or absolute MB; either crossing counts.
    hard_pct / hard_mb: hard threshold; crossing it aborts the running work with MemoryAbort.
    poll_ms: sampling period in milliseconds.
    actions: what a soft crossing does: "warn" (one log line) and/or "empty_cache".
    log_path: optional CSV with one row per sample (`LOG_COLUMNS`).
    Thresholds left as None are not checked; with none set the watchdog only records peak usage.
    """

    enabled: bool = True
    soft_pct: float | None = None
    hard_pct: float | None = None
    soft_mb: float | None = None
    hard_mb: float | None = None
    poll_ms: int = 200
    actions: tuple[str, ...] = ("warn", "empty_cache")
    log_path: str | Path | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        if not isinstance(self.enabled, bool):
            raise UserError(f"watchdog enabled must be true or false, got {self.enabled!r}")
        for name in ("soft_pct", "hard_pct", "soft_mb", "hard_mb"):
            value = _parse_float(name, getattr(self, name))
            set_(self, name, value)
            if value is None:
                continue
            if name.endswith("_pct") and not 0 < value <= 100:
                raise UserError(f"{name} must be in (0, 100], got {value:g}: pass a percentage like 90")
            if name.endswith("_mb") and value <= 0:
                raise UserError(f"{name} must be > 0 MB, got {value:g}")
        for unit in ("pct", "mb"):
            soft, hard = getattr(self, f"soft_{unit}"), getattr(self, f"hard_{unit}")
            if soft is not None and hard is not None and soft >= hard:
                raise UserError(f"soft_{unit}={soft:g} must be below hard_{unit}={hard:g}: lower the soft threshold")
        if isinstance(self.poll_ms, bool) or not isinstance(self.poll_ms, int) or self.poll_ms < 1:
            raise UserError(f"poll_ms must be an integer >= 1, got {self.poll_ms!r}")
        set_(self, "actions", _parse_actions("actions", self.actions))
        if self.log_path is not None:
            set_(self, "log_path", Path(self.log_path))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "WatchdogConfig":
        """Read the `XLSTM_MEM_*` variables (empty ones count as unset); `overrides` win over them."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            text = raw.strip()
            if name == "enabled":
                if text.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                    raise UserError(f"{var} must be 0 or 1, got {raw!r}")
                values[name] = text.lower() in ("1", "true", "yes", "on")
            elif name == "poll_ms":
                try:
                    values[name] = int(text)
                except ValueError:
                    raise UserError(f"{var} must be an integer number of milliseconds >= 1, got {raw!r}") from None
            elif name == "actions":
                values[name] = _parse_actions(var, text)
            else:
                values[name] = _parse_float(var, text)
        values.update(overrides)
        try:
            return cls(**values)
        except UserError as err:  # name the variable that carried the bad value
            bad = next((ENV_VARS[k] for k in values if k not in overrides and str(err).startswith(k)), None)
            if bad is None:
                raise
            raise UserError(f"{bad}: {err}") from None


@dataclass(frozen=True)
class MemoryEvent:
    """One threshold crossing as the watchdog saw it."""

    kind: str  # "soft" or "hard"
    time_s: float  # seconds since the watchdog started
    used_mb: float
    total_mb: float
    message: str


# ---- aborting another thread ------------------------------------------------------------------------
def _abort_class(message: str) -> type[MemoryAbort]:
    """PyThreadState_SetAsyncExc raises a *class*, instantiated without arguments, so the message rides on a
    one-off subclass. It is still a MemoryAbort, and pickles as a plain one (trial workers send it back)."""

    def __init__(self: MemoryAbort, *args: Any) -> None:
        MemoryAbort.__init__(self, *(args or (message,)))

    def __reduce__(self: MemoryAbort) -> tuple[Any, ...]:
        return (MemoryAbort, self.args)

    return type("MemoryAbort", (MemoryAbort,), {
        "__init__": __init__, "__reduce__": __reduce__, "__module__": MemoryAbort.__module__,
    })


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    """Schedule `exc` in thread `thread_id` (None clears a scheduled one that has not fired yet)."""
    arg = ctypes.py_object(exc) if exc is not None else None
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), arg)
    if n > 1:  # cannot happen for a live thread id; undo as the C-API docs ask
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


_ACTIVE: list["MemoryWatchdog"] = []
_ACTIVE_LOCK = threading.Lock()


def checkpoint() -> None:
    """Cooperative abort point: raise MemoryAbort if any running watchdog has seen its hard threshold.

    Cheap enough to call between chunks and from worker threads (which async injection does not reach).
    """
    if _ACTIVE:
        for watchdog in tuple(_ACTIVE):
            watchdog.check()


# ---- the watchdog -----------------------------------------------------------------------------------
class MemoryWatchdog:
    """Polls device memory on a daemon thread; soft crossings run actions, hard crossings abort.

    ::

        with MemoryWatchdog(WatchdogConfig.from_env(), device) as wd:
            run_prefill()          # MemoryAbort is raised here if the hard threshold is crossed

    A `with` block in which the hard threshold was crossed always ends in MemoryAbort, even if the
    injected exception was caught inside it or the crossing came too late to interrupt anything.
    `start()` / `stop()` do the same without that guarantee: `stop()` never raises (apart from an
    injected MemoryAbort landing in it), so call `check()` afterwards. `interrupt=False` disables the
    injection and leaves aborting to `check()` / `checkpoint()`.

    Counters: `soft_events`, `hard_events` (crossings, cumulative over restarts), `peak_used_mb`,
    `polls` (samples taken), `events` (MemoryEvent list), `last_stats` (latest `memory_stats`).
    """

    def __init__(
        self,
        config: WatchdogConfig | None = None,
        device: str | torch.device = "cpu",
        *,
        interrupt: bool = True,
    ) -> None:
        self.config = config if config is not None else WatchdogConfig()
        self.device = devmod.resolve_device(device)
        self.interrupt = interrupt
        self.soft_events = 0
        self.hard_events = 0
        self.peak_used_mb = 0.0
        self.polls = 0
        self.events: list[MemoryEvent] = []
        self.last_stats: dict[str, float] = {}
        self._label = devmod.watched_memory_label(self.device)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._target: threading.Thread | None = None
        self._log: IO[str] | None = None
        self._csv: Any = None
        self._abort_message: str | None = None
        self._armed = False  # may inject into the target thread
        self._injected = False
        self._soft_above = False
        self._hard_above = False
        self._stats_failed = False
        self._t0 = 0.0

    # ---- lifecycle ----
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def aborted(self) -> bool:
        """Whether the hard threshold was crossed since the last `start()`."""
        return self._abort_message is not None

    def start(self) -> "MemoryWatchdog":
        """Start polling; a hard crossing will interrupt the calling thread. No-op when disabled."""
        if self._thread is not None:
            raise RuntimeError("memory watchdog is already running: stop() it before starting it again")
        if not self.config.enabled:
            return self
        self._abort_message = None
        self._injected = False
        self._soft_above = self._hard_above = False
        self._target = threading.current_thread()
        self._open_log()
        self._stop.clear()
        self._armed = self.interrupt
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="xlstm-mem-watchdog", daemon=True)
        with _ACTIVE_LOCK:
            _ACTIVE.append(self)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, join the thread, close the log. Cancels an injected MemoryAbort not yet raised."""
        self._disarm()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        with _ACTIVE_LOCK:
            if self in _ACTIVE:
                _ACTIVE.remove(self)
        if self._log is not None:
            self._log.close()
            self._log = self._csv = None

    def __enter__(self) -> "MemoryWatchdog":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> bool:
        try:
            self._disarm()
        finally:
            self.stop()
        if exc_type is None and self._abort_message is not None:
            raise MemoryAbort(self._abort_message)
        return False

    def check(self) -> None:
        """Raise MemoryAbort if the hard threshold has been crossed since the last `start()`."""
        if self._abort_message is not None:
            raise MemoryAbort(self._abort_message)

    # ---- polling ----
    def _disarm(self) -> None:
        with self._lock:
            if self._armed and self._injected and self._target is not None and self._target.ident is not None:
                _set_async_exc(self._target.ident, None)
            self._armed = False

    def _run(self) -> None:
        while True:
            self._poll()
            if self._stop.wait(self.config.poll_ms / 1000.0):
                return
            if self._target is not None and not self._target.is_alive():
                return  # nobody left to protect

    def _poll(self) -> None:
        try:
            stats = devmod.memory_stats(self.device)
        except Exception as err:  # keep watching; say so once
            if not self._stats_failed:
                self._stats_failed = True
                logger.warning("memory watchdog: reading memory stats on %s failed: %s", self.device, err)
            return
        cfg = self.config
        used, total = stats["watched_used_mb"], stats["watched_total_mb"]
        pct = used / total * 100.0 if total > 0 else float("nan")
        now = time.perf_counter() - self._t0
        self.peak_used_mb = max(self.peak_used_mb, used)

        event = ""
        hard = self._crossed("hard", used, total, pct, cfg.hard_mb, cfg.hard_pct)
        soft = self._crossed("soft", used, total, pct, cfg.soft_mb, cfg.soft_pct)
        if hard and not self._hard_above:
            event = "hard"
            self.hard_events += 1
            message = f"memory watchdog on {self.device}: {hard}"
            self.events.append(MemoryEvent("hard", now, used, total, message))
            self._abort(message)
        elif soft and not self._soft_above:  # a jump straight past hard counts as hard only
            event = "soft"
            self.soft_events += 1
            message = f"memory watchdog on {self.device}: {soft}"
            self.events.append(MemoryEvent("soft", now, used, total, message))
            self._soft_actions(message)
        self._hard_above, self._soft_above = hard is not None, soft is not None
        self.last_stats = stats
        self.polls += 1
        if self._csv is not None:
            self._csv.writerow([f"{now:.3f}", f"{used:.1f}", f"{total:.1f}", f"{pct:.2f}",
                                f"{stats['process_rss_mb']:.1f}", event])
            self._log.flush()  # type: ignore[union-attr]

    def _crossed(
        self, level: str, used: float, total: float, pct: float, limit_mb: float | None, limit_pct: float | None
    ) -> str | None:
        """Why `level` is crossed (one line naming the limit and how to raise it), or None."""
        if limit_mb is not None and used >= limit_mb:
            return (f"{self._label} {used:.0f} MB >= {level} limit {limit_mb:.0f} MB "
                    f"(raise it with {ENV_VARS[level + '_mb']} / {_FLAGS[level + '_mb']})")
        if limit_pct is not None and pct >= limit_pct:  # NaN (unknown total) never compares >=
            return (f"{self._label} {used:.0f} MB of {total:.0f} MB ({pct:.1f}%) >= {level} limit {limit_pct:g}% "
                    f"(raise it with {ENV_VARS[level + '_pct']} / {_FLAGS[level + '_pct']})")
        return None

    def _soft_actions(self, message: str) -> None:
        for action in self.config.actions:
            if action == "warn":
                logger.warning("%s", message)
            elif action == "empty_cache":
                try:
                    devmod.empty_cache(self.device)
                except Exception as err:  # relief is best effort; never kill the watcher
                    logger.warning("memory watchdog: empty_cache on %s failed: %s", self.device, err)

    def _abort(self, message: str) -> None:
        logger.info("%s; aborting", message)  # the MemoryAbort carries the message to whoever reports it
        with self._lock:
            self._abort_message = message
            if self._armed and not self._injected and self._target is not None and self._target.ident is not None:
                _set_async_exc(self._target.ident, _abort_class(message))
                self._injected = True

    def _open_log(self) -> None:
        path = self.config.log_path
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists() or path.stat().st_size == 0
            self._log = open(path, "a", newline="", encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write memory log {str(path)!r}: {err.strerror or err}: pick a writable --mem-log path") from None
        self._csv = csv.writer(self._log)
        if new:
            self._csv.writerow(LOG_COLUMNS)
            self._log.flush()
