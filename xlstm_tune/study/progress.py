"""Progress of a study on stderr: a tqdm bar on a terminal, plain lines otherwise.

Besides one line per finished trial it shows what the running trial is doing (the worker's phase
messages: loading the model, the screen, prefill at each length and call, decode, fidelity, quality) and
an estimate of how long the trials still take. A 7B trial can run for a minute and a worker start for
longer: without the phase the display looks frozen. On a terminal the bar's description follows every
phase; in a log (no terminal) a phase gets a line once it has lasted `quiet_s`, and a still-running phase
another line every `repeat_s`, so quick trials stay one line each and slow ones explain themselves.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

QUIET_S = 5.0     # a phase shorter than this gets no line of its own in a log
REPEAT_S = 30.0   # a phase still running gets a line this often


def duration_text(seconds: float) -> str:
    """'45 s', '3 min', '1 h 05 min': how long, at the precision an estimate deserves."""
    if seconds < 10:
        return f"{max(0.0, seconds):.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Progress:
    """A tqdm bar on a terminal (best so far as postfix); plain lines otherwise."""

    def __init__(self, enabled: bool | None, total: int, initial: int, name: str, err: TextIO, *,
                 timeout_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 quiet_s: float = QUIET_S, repeat_s: float = REPEAT_S) -> None:
        self.err = err
        self.total = total
        self.initial = initial
        self.timeout_s = timeout_s
        self.clock = clock
        self.quiet_s = quiet_s
        self.repeat_s = repeat_s
        self.started = clock()
        self.completed = initial
        self.label = "worker"            # what the current phases belong to: "worker" or "trial N"
        self.title = ""                  # "trial N backend/cC" for the bar
        self.phase_msg: dict[str, Any] | None = None
        self.phase_since = self.started  # when the current stage began
        self.trial_since = self.started
        self.printed_stage: str | None = None
        self.last_line = self.started
        self.live = enabled if enabled is not None else bool(getattr(err, "isatty", lambda: False)())
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc=f"study {name}", unit="trial",
                            file=err, dynamic_ncols=True, leave=True)

    # ---- estimate ------------------------------------------------------------------------------------
    def remaining_s(self) -> tuple[float, str] | None:
        """(seconds of trials left, why) from this run's rate of COMPLETE trials, capped by the study's
        time limit; None before this run completed a trial and without a time limit."""
        now = self.clock()
        elapsed = now - self.started
        done = self.completed - self.initial
        by_limit = None if self.timeout_s is None else max(0.0, self.timeout_s - elapsed)
        if done <= 0:
            return None if by_limit is None else (by_limit, "time limit")
        by_rate = (self.total - self.completed) * elapsed / done
        if by_limit is not None and by_limit < by_rate:
            return by_limit, "time limit"
        return by_rate, "at this run's pace"

    def eta_text(self) -> str:
        left = self.remaining_s()
        if left is None or self.completed >= self.total:
            return ""
        return f"trials: ~{duration_text(left[0])} left ({left[1]})"

    # ---- phases --------------------------------------------------------------------------------------
    def running(self, number: int, knobs: Mapping[str, Any]) -> None:
        self.label = f"trial {number}"
        self.title = f"trial {number} {knobs['backend']}/c{knobs['chunk_size']}"
        self.trial_since = self.phase_since = self.clock()
        self.phase_msg = None
        self.printed_stage = None
        if self.bar is not None:
            self.bar.set_description_str(self.title)

    def section(self, label: str) -> None:
        """Phases from now on belong to `label` (e.g. the confirmation round), not to a trial."""
        self.label = self.title = label
        self.trial_since = self.phase_since = self.clock()
        self.phase_msg = None
        self.printed_stage = None

    def phase(self, msg: Mapping[str, Any]) -> None:
        """A worker's phase message ({"stage", "detail", "number"})."""
        now = self.clock()
        if msg.get("number") is None and self.label.startswith("trial") and self.phase_msg is None:
            self.label = "worker"  # a worker (re)starting before the trial's first phase
        if self.phase_msg is None or self.phase_msg.get("stage") != msg.get("stage"):
            self.phase_since = now
        self.phase_msg = dict(msg)
        if self.bar is not None:
            head = self.title or self.label
            self.bar.set_description_str(f"{head}: {msg.get('stage')}, {msg.get('detail')}", refresh=True)
            return
        self.tick()

    def tick(self) -> None:
        """Called while the study waits on a worker: a log line for a phase that has lasted."""
        if self.bar is not None or self.phase_msg is None:
            return
        now = self.clock()
        stage = str(self.phase_msg.get("stage"))
        fresh = stage != self.printed_stage and now - self.phase_since >= self.quiet_s
        if fresh or now - self.last_line >= self.repeat_s:
            what = "still " if stage == self.printed_stage else ""
            since = now - (self.phase_since if self.label == "worker" else self.trial_since)
            line = f"{what}{stage}: {self.phase_msg.get('detail')} ({duration_text(since)} in)"
            self.err.write((f"[{self.label}] {line}" if self.label.startswith(("trial", "worker"))
                            else line[:1].upper() + line[1:]) + "\n")
            self.err.flush()
            self.printed_stage = stage
            self.last_line = now

    # ---- outcomes ------------------------------------------------------------------------------------
    def done(self, rec: Mapping[str, Any], completed: int, best: str) -> None:
        self.completed = completed
        self.phase_msg = None
        self.last_line = self.clock()
        eta = self.eta_text()
        if self.bar is not None:
            if rec["state"] == "COMPLETE":
                self.bar.update(1)
            self.bar.set_postfix_str(best + (f" | {eta}" if eta else ""), refresh=True)
            return
        if rec["state"] == "COMPLETE":
            what = f"prefill {rec.get('prefill_tok_s', float('nan')):,.0f} tok/s, decode {rec.get('decode_tok_s', float('nan')):,.0f} tok/s"
            if not rec.get("feasible"):
                what += f", INFEASIBLE (fidelity rel_err {rec.get('fidelity_rel_err', float('nan')):.1e})"
            if rec.get("duplicate_of") is not None:
                what += f" (same configuration as #{rec['duplicate_of']})"
        else:
            what = f"{rec.get('failure_reason')}: {rec.get('error') or rec.get('prune_reason') or ''}"[:200]
        took = rec.get("duration_s")
        took_text = f" in {duration_text(float(took))}:" if isinstance(took, (int, float)) and took > 0 else ""
        self.err.write(f"[trial {rec['number']}] {rec['state']}{took_text} {what} | {completed} complete | {best}"
                       + (f" | {eta}" if eta else "") + "\n")
        self.err.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
