"""Failure classification and fault injection for trial workers.

Every failed trial gets one reason (docs/STUDY.md "Failures"):

    crash               the worker process died (segfault, abort, killed by a signal or the OOM killer)
    compile_error       torch._dynamo / torch._inductor raised (compilation failed)
    oom                 the device or host allocator ran out of memory
    memory_abort        the memory watchdog's hard limit aborted the trial (runtime.watchdog.MemoryAbort)
    timeout             the trial ran past its time limit and its worker was killed
    invalid_combination the knobs cannot run together here (checked before running, or refused by the runtime)
    fidelity            the trial ran but its logits drifted past tolerance (infeasible, never best)
    interrupted         the study process was killed while the trial ran; its settings are re-queued
    error               anything else (the captured traceback says what)

Fault injection exercises the real failure paths in tests: `XLSTM_TUNE_INJECT_FAULT="3:crash,5:timeout"`
makes trial 3's worker abort and trial 5's worker hang. The faults are real: `os.abort()`, a SIGSEGV, a
torch.compile whose backend fails, an allocation no machine can satisfy, a memory watchdog with a 1 MB
hard limit, a sleep past the timeout. `delay` is not a failure: the trial sleeps 20 s, then measures.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import Any, Callable

from xlstm_tune.errors import MemoryAbort, UserError, exception_chain

FAULT_ENV = "XLSTM_TUNE_INJECT_FAULT"
FAULT_KINDS = ("crash", "segfault", "compile_error", "oom", "memory_abort", "timeout", "error", "delay")
DELAY_S = 20.0  # the `delay` fault: a slow but successful trial (to kill a study mid-trial in tests)
FAILURE_REASONS = ("crash", "compile_error", "oom", "memory_abort", "timeout", "invalid_combination",
                   "fidelity", "interrupted", "error")
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def parse_faults(text: str | None) -> dict[int, str]:
    """`"3:crash,4:compile_error"` -> {3: "crash", 4: "compile_error"}; UserError on anything else."""
    if not text or not text.strip():
        return {}
    out: dict[int, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        number, sep, kind = part.partition(":")
        kind = kind.strip().lower()
        if not sep or not number.strip().isdigit() or kind not in FAULT_KINDS:
            raise UserError(f"{FAULT_ENV}: bad entry {part!r}: use TRIAL:KIND with KIND in {', '.join(FAULT_KINDS)}")
        out[int(number)] = kind
    return out


def faults_from_env(environ: Mapping[str, str] | None = None) -> dict[int, str]:
    return parse_faults((os.environ if environ is None else environ).get(FAULT_ENV))


_COMPILER_MODULES = ("torch._dynamo", "torch._inductor")
_COMPILER_PATHS = ("/torch/_dynamo/", "/torch/_inductor/", "/torch/fx/", "/torch/_functorch/")


def _raised_in_compiler(exc: BaseException) -> bool:
    """Whether the frame that raised `exc` belongs to torch.compile's machinery (dynamo, inductor, FX)."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
    return any(p in name for p in _COMPILER_PATHS)


def classify_exception(exc: BaseException) -> str:
    """The failure reason for an exception raised while a trial ran (see the module docstring)."""
    chain = exception_chain(exc)
    if any(isinstance(e, MemoryAbort) for e in chain):
        return "memory_abort"
    for e in chain:
        names = [c.__name__ for c in type(e).__mro__]
        if "OutOfMemoryError" in names or any(t in str(e).lower() for t in _OOM_TEXT):
            return "oom"
    for e in chain:
        if any(c.__module__.startswith(_COMPILER_MODULES) for c in type(e).__mro__):
            return "compile_error"
        if _raised_in_compiler(e):
            return "compile_error"  # e.g. a plain RuntimeError raised by dynamo/FX while tracing
    if isinstance(exc, UserError):
        return "invalid_combination"
    return "error"


def describe_signal(exitcode: int | None) -> str:
    """`-11` -> "signal SIGSEGV"; a positive code -> "exit code N"."""
    if exitcode is None:
        return "no exit code"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = str(-exitcode)
        extra = " (possibly the system's out-of-memory killer)" if -exitcode == signal.SIGKILL else ""
        return f"signal {name}{extra}"
    return f"exit code {exitcode}"


# ---- injection (runs inside the worker) -------------------------------------------------------------
def inject(kind: str, *, device: Any, busy_work: Callable[[], None]) -> None:
    """Cause the real failure `kind` in this (worker) process. `busy_work` is one model call."""
    if kind == "crash":
        os.abort()
    if kind == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(5)
    if kind == "timeout":
        time.sleep(10**6)
    if kind == "error":
        raise RuntimeError("injected error (XLSTM_TUNE_INJECT_FAULT)")
    if kind == "delay":
        time.sleep(DELAY_S)
        return
    from xlstm_tune.bench.harness import provoke_failure

    provoke_failure(kind, device, busy_work)
