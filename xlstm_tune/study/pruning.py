"""Early stopping over the Pareto front: when a partly measured trial is hopeless, and when it is too slow.

A trial is measured in stages (`STAGES`): one cheap prefill repeat at the shortest context (`screen`),
the full prefill at every context, then decode. After each stage the worker asks `verdict` whether to go
on. Optuna's pruners compare one intermediate value with other trials' values at the same step; a
Pareto study needs a rule over several objectives, so this module states one:

    A trial is hopeless when some feasible trial p of the study beats it by the margin on every objective
    the trial already has a figure for, and p is within noise of the study's best on every objective the
    trial has no figure for yet.

Why the second condition: a trial's unmeasured objectives could still put it on the Pareto front; the rule
assumes they will be no better than the best the study has seen (within noise), and prunes only when even
then the trial would be dominated, by a margin, by a configuration that was actually measured.

    margin(figure) = max(rule.margin, 1 + rule.noise_k * cv(figure))

`cv(figure)` is the median coefficient of variation of that figure over the study's measured trials (the
repeat-to-repeat noise of one sample, which is what the one-repeat screen figure carries). The prefill
objective of a partial measurement is the geometric mean over the contexts measured so far, compared with
the same contexts of p. Decode is the last stage, so it can only hold a trial's figure, never prune it.

The screen is one timed call, the second ever of its shape in that configuration; on the recorded grids
one came out at 0.47 of the full figure of the same kernels in another trial (docs/STUDY.md): wider than
the margin. So the screen prunes only a trial behind by `screen_margin` (default 4, the margin squared);
one nearer goes on to its full measurement at that context, whose repeats replace the screen's figure and
are judged with the margin. Step-block configurations 20-100x behind native still stop at their screen.

A figure taken on a busy machine never prunes: when the load probe (bench.load) flagged a figure the
trial has (`prefill_busy_ctx<L>`, `decode_busy`: other processes took more than `[bench] max_other_cpu`
of our CPUs even after the harness re-measured it), the load rather than the configuration may have made
it slow, so the trial goes on to its next stage, whose figure replaces the flagged one (the full prefill
at the screen's context replaces the screen).

A per-trial time limit follows the study as well: `time_limit_s` is `slow_factor` times the median
duration of the study's measured trials (at least `slow_min_s`); a trial past it stops after its current
stage and is recorded PRUNED with reason `slow`.

Everything here is pure (plain data in, plain data out): the worker applies it, replay applies it to
recorded figures, and tests apply it to constructed data.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STAGE_SCREEN = "screen"
STAGE_DECODE = "decode"
PRUNED_REASON = "hopeless"
SLOW_REASON = "slow"


def stage_prefill(context_len: int) -> str:
    return f"prefill_ctx{context_len}"


def stages(context_lens: Sequence[int], decode: bool = True) -> list[str]:
    """The measurement stages in the order they run."""
    out = [STAGE_SCREEN] + [stage_prefill(n) for n in context_lens]
    return out + ([STAGE_DECODE] if decode else [])


@dataclass(frozen=True)
class PruneRule:
    """The spec's `[pruning]` settings (docs/STUDY.md, "Early stopping and multi-fidelity")."""

    enabled: bool = True
    margin: float = 2.0          # a trial continues while it is within this factor of a front point
    noise_k: float = 3.0         # ... or within noise_k coefficients of variation, whichever is wider
    min_trials: int = 1          # feasible measured trials needed before anything is pruned
    slow_factor: float = 4.0     # a trial past slow_factor x the median trial time is cut
    slow_min_s: float = 30.0     # ... but never before this many seconds
    screen_margin: float = 4.0   # the one-call screen prunes only a trial this far behind (module docstring)

    @classmethod
    def from_spec(cls, section: Mapping[str, Any]) -> "PruneRule":
        return cls(**{k: section[k] for k in cls.__dataclass_fields__ if k in section})


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) and f > 0 else None


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def objective_figure(figures: Mapping[str, Any], objective: str) -> float | None:
    """The value of `objective` from (possibly partial) figures: prefill_tok_s_ctx<L> and decode_tok_s keys.

    `prefill_tok_s` is the geometric mean over the contexts present; None when no figure is there.
    """
    if objective == "prefill_tok_s":
        vals = [v for k, v in figures.items() if _is_ctx_key(k) and _num(v) is not None]
        return _geomean([float(v) for v in vals]) if vals else None
    return _num(figures.get(objective))


def _is_ctx_key(key: str) -> bool:
    return key.startswith("prefill_tok_s_ctx") and key.count("_") == 3


def _is_busy_flag(key: str) -> bool:
    """`prefill_busy_ctx<L>` / `decode_busy`: the harness's flag of a figure taken on a busy machine."""
    return (key.startswith("prefill_busy_ctx") and key.count("_") == 2) or key == "decode_busy"


def _point_figure(point: Mapping[str, Any], objective: str, trial_figures: Mapping[str, Any]) -> float | None:
    """A front point's value of `objective`, over the same contexts the trial has figures for."""
    if objective == "prefill_tok_s":
        keys = [k for k in trial_figures if _is_ctx_key(k) and _num(trial_figures[k]) is not None]
        vals = [_num(point.get(k)) for k in keys]
        if not keys or any(v is None for v in vals):
            return None
        return _geomean([float(v) for v in vals])  # type: ignore[arg-type]
    return _num(point.get(objective))


def stage_figures(flat: Mapping[str, Any]) -> dict[str, float]:
    """The figures the rule reads from one stage's flat metrics (prefill_tok_s_ctx<L>, decode_tok_s, their
    CVs, and 1.0 for a figure flagged busy), so that replay applies the rule as the worker did."""
    keep = {}
    for k, v in flat.items():
        base = k[:-3] if k.endswith("_cv") else k
        if (_is_ctx_key(base) or base == "decode_tok_s") and _num(v) is not None:
            keep[k] = float(v)
        elif _is_busy_flag(k) and v:
            keep[k] = 1.0
    return keep


def noise_cv(records: Sequence[Mapping[str, Any]], figure: str) -> float:
    """Median CV of `figure` over measured COMPLETE records (0.0 when none recorded one)."""
    cvs = [float(r[f"{figure}_cv"]) for r in records
           if r.get("state") == "COMPLETE" and r.get("duplicate_of") is None
           and _num(r.get(f"{figure}_cv")) is not None]
    return statistics.median(cvs) if cvs else 0.0


def front(records: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> list[dict[str, Any]]:
    """The feasible measured trials that no other one dominates, as {number, prefill_tok_s_ctx<L>.., decode_tok_s}."""
    pts = []
    for r in records:
        if r.get("state") != "COMPLETE" or not r.get("feasible") or r.get("duplicate_of") is not None:
            continue
        vals = [objective_figure(r, o) for o in objectives]
        if any(v is None for v in vals):
            continue
        point = {k: float(v) for k, v in r.items() if (_is_ctx_key(k) or k == "decode_tok_s") and _num(v) is not None}
        point["number"] = r.get("number")
        pts.append((vals, point))
    out = []
    for vals, point in pts:
        dominated = any(all(o >= v for o, v in zip(other, vals)) and other != vals for other, _ in pts)
        if not dominated:
            out.append(point)
    return out


def thresholds(records: Sequence[Mapping[str, Any]], objectives: Sequence[str], rule: PruneRule) -> dict[str, Any] | None:
    """What the worker needs to apply the rule to a new trial (None: nothing may be pruned yet).

    {"objectives": [...], "front": [points], "margins": {figure: m}, "tolerance": {figure: t}}; figure is
    an objective name, or prefill_tok_s_ctx<L> for each context (the prefill objective's parts).
    """
    if not rule.enabled:
        return None
    feasible = [r for r in records if r.get("state") == "COMPLETE" and r.get("feasible")
                and r.get("duplicate_of") is None]
    if len(feasible) < max(1, rule.min_trials):
        return None
    pts = front(records, objectives)
    if not pts:
        return None
    figures = sorted({k for p in pts for k in p if k != "number"})
    margins, tolerance = {}, {}
    for f in figures:
        cv = noise_cv(records, f)
        margins[f] = max(rule.margin, 1.0 + rule.noise_k * cv)
        tolerance[f] = 1.0 + rule.noise_k * cv
    return {"objectives": list(objectives), "front": pts, "margins": margins, "tolerance": tolerance,
            "screen_margin": rule.screen_margin}


def _margin_for(objective: str, trial_figures: Mapping[str, Any], table: Mapping[str, float], default: float) -> float:
    if objective == "prefill_tok_s":
        vals = [table.get(k, default) for k in trial_figures if _is_ctx_key(k)]
        return max(vals) if vals else default
    return table.get(objective, default)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def verdict(limits: Mapping[str, Any] | None, figures: Mapping[str, Any], stage: str | None = None) -> str | None:
    """Why a trial with these (partial) figures is hopeless, or None when it may go on. See the module docstring.

    `stage`: the stage just measured; after `STAGE_SCREEN` the wider `screen_margin` applies."""
    if not limits or not limits.get("front"):
        return None
    if any(v and _is_busy_flag(k) for k, v in figures.items()):
        return None  # taken on a busy machine: the next stage measures it again (module docstring)
    objectives = list(limits["objectives"])
    mine = {o: objective_figure(figures, o) for o in objectives}
    measured = [o for o in objectives if mine[o] is not None]
    if not measured:
        return None
    unmeasured = [o for o in objectives if mine[o] is None]
    margins, tolerance = limits.get("margins") or {}, limits.get("tolerance") or {}
    floor = float(limits.get("screen_margin") or 1.0) if stage == STAGE_SCREEN else 1.0
    best_u = {u: max((_num(p.get(u)) or 0.0) if u != "prefill_tok_s" else (objective_figure(p, u) or 0.0)
                     for p in limits["front"]) for u in unmeasured}
    for p in limits["front"]:
        ok = True
        for u in unmeasured:
            pu = objective_figure(p, u) if u == "prefill_tok_s" else _num(p.get(u))
            if pu is None or pu * _margin_for(u, p, tolerance, 1.0) < best_u[u]:
                ok = False
                break
        if not ok:
            continue
        parts = []
        for o in measured:
            po = _point_figure(p, o, figures)
            m = max(_margin_for(o, figures, margins, 2.0), floor)
            if po is None or po < m * float(mine[o]):  # type: ignore[arg-type]
                ok = False
                break
            parts.append(f"{o} {_fmt(float(mine[o]))} < {_fmt(po)} / {m:.2f}")  # type: ignore[arg-type]
        if ok:
            return f"{'; '.join(parts)} (trial #{p.get('number')})"
    return None


def time_limit_s(records: Sequence[Mapping[str, Any]], rule: PruneRule) -> float | None:
    """The study's time limit for the next trial (None: no limit yet, or early stopping off)."""
    if not rule.enabled:
        return None
    times = [float(r["duration_s"]) for r in records
             if r.get("state") == "COMPLETE" and r.get("duplicate_of") is None and _num(r.get("duration_s"))]
    if not times:
        return None
    return max(rule.slow_min_s, rule.slow_factor * statistics.median(times))


def slow_reason(elapsed_s: float, limit_s: float | None) -> str | None:
    if limit_s is None or elapsed_s <= limit_s:
        return None
    return f"ran {elapsed_s:.1f} s, past the study's limit of {limit_s:.1f} s (slow_factor x the median trial)"
