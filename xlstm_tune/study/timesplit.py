"""Where a study's time went: measuring, pruned trials, failures, compile/warm-up, fidelity, confirmation.

Each trial record carries `duration_s` and, when the worker measured it, `phases` (`compile_s`: first
calls, which hold compilation and graph capture; `measure_s`: the timed and warm-up calls; `fidelity_s`).
The split sums them by what became of the trial; worker start-up (model load) counts as compile/warm-up.
The result is plain data: run_meta.json keeps it, the summary and report.md render it.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

PARTS = ("measuring", "pruned", "failed", "compile_warmup", "fidelity", "confirmation", "other")
LABELS = {"measuring": "measuring (complete trials)", "pruned": "pruned trials (early stopped, slow)",
          "failed": "failed trials", "compile_warmup": "model load, compile and warm-up",
          "fidelity": "fidelity checks", "confirmation": "confirmation round",
          "other": "study overhead (sampling, logging, files)"}


def _f(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if math.isfinite(v) and v > 0 else 0.0


def ran(rec: Mapping[str, Any]) -> bool:
    """A trial that spent measuring time (not answered from a record, not refused before running)."""
    return rec.get("duplicate_of") is None and rec.get("failure_reason") not in ("invalid_combination", "not_recorded") \
        and _f(rec.get("duration_s")) > 0


def time_split(records: Sequence[Mapping[str, Any]], *, load_s: float = 0.0, confirm_s: float = 0.0,
               wall_s: float | None = None) -> dict[str, Any]:
    """Seconds per part (PARTS), trials that ran, and trials per minute of `wall_s` (or of the parts' sum)."""
    out = {p: 0.0 for p in PARTS}
    out["compile_warmup"] = _f(load_s)
    out["confirmation"] = _f(confirm_s)
    n = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    for r in records:
        if not ran(r):
            continue
        state, dur = r.get("state"), _f(r.get("duration_s"))
        if state in n:
            n[state] += 1
        if state == "PRUNED":
            out["pruned"] += dur
        elif state == "FAIL":
            out["failed"] += dur
        elif state == "COMPLETE":
            ph = r.get("phases") or {}
            if ph:
                out["compile_warmup"] += _f(ph.get("compile_s"))
                out["fidelity"] += _f(ph.get("fidelity_s"))
                out["measuring"] += max(0.0, dur - _f(ph.get("compile_s")) - _f(ph.get("fidelity_s")))
            else:
                out["measuring"] += dur
    accounted = sum(out[p] for p in PARTS if p != "other")
    total = accounted
    if wall_s is not None and _f(wall_s) >= accounted:
        out["other"] = _f(wall_s) - accounted
        total = _f(wall_s)
    trials = sum(n.values())
    out["rows"] = [[LABELS[p], round(out[p], 3), round(100.0 * out[p] / total, 1) if total > 0 else 0.0]
                   for p in PARTS if out[p] > 0 or p in ("measuring", "pruned")]
    out.update(total_s=total, trials=trials, complete=n["COMPLETE"], pruned_trials=n["PRUNED"], failed_trials=n["FAIL"],
               trials_per_min=(trials / (total / 60.0)) if total > 0 else None)
    return out


def render_lines(split: Mapping[str, Any]) -> list[str]:
    """`part  seconds  share` lines plus a trials-per-minute line (plain text, for the summary and report.md)."""
    total = _f(split.get("total_s"))
    if total <= 0:
        return []
    width = max(len(v) for v in LABELS.values())
    lines = []
    for p in PARTS:
        s = _f(split.get(p))
        if s > 0 or p in ("measuring", "pruned"):
            lines.append(f"  {LABELS[p].ljust(width)}  {s:9.1f} s  {100.0 * s / total:5.1f}%")
    rate = split.get("trials_per_min")
    lines.append(f"  {'total'.ljust(width)}  {total:9.1f} s   {split.get('trials', 0)} trials ran "
                 f"({split.get('complete', 0)} complete, {split.get('pruned_trials', 0)} pruned, "
                 f"{split.get('failed_trials', 0)} failed)" + (f", {rate:.2f} trials/min" if rate else ""))
    return lines
