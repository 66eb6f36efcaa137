"""Plots of a study's trials: which knob values were fastest, the prefill/decode trade-off, progress.

Inputs are the records of a study's ``trials.jsonl`` (one dict per trial) and the per-step CSVs of
``python -m xlstm_tune run --stats-log``. Every function writes one PNG and returns its path; empty or
all-failed input gives a figure that says "no data" instead of an exception, so ``plot_all`` can run
at the end of any study.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never pyplot:
no global backend switch, no display needed, safe in worker threads.
"""
from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from xlstm_tune.atomic_files import write_bytes_atomic
from xlstm_tune.errors import UserError

__all__ = [
    "KNOBS",
    "pareto_front",
    "best_by_knob",
    "plot_best_by_knob",
    "plot_prefill_vs_decode",
    "prefill_vs_decode_figure",
    "decode_steps_figure",
    "plot_history",
    "plot_param_importances",
    "plot_decode_steps",
    "plot_all",
]

KNOBS: tuple[str, ...] = (
    "backend", "chunk_size", "heads_per_band", "workers", "t_inner", "streams", "decode_mode",
)
_KNOB_AXIS = {
    "chunk_size": "chunk_size (tokens per chunk)",
    "heads_per_band": "heads_per_band (heads per task)",
    "workers": "workers (coordinator threads)",
    "t_inner": "t_inner (timesteps per compiled block)",
    "streams": "streams (device streams)",
}
_METRICS = {
    "decode_tok_s": ("decode tok/s", "decode throughput", "tok/s"),
    "prefill_tok_s": ("prefill tok/s", "prefill throughput", "tok/s"),
    "prefill_s": ("prefill s", "prefill time", "s"),
    "decode_s": ("decode s", "decode time", "s"),
}
_STATS_COLUMNS = ("step", "dt_ms", "cum_ms", "inst_tok_s", "avg_tok_s")

C_FEASIBLE, C_FRONT, C_INFEASIBLE, C_FAILED, C_BEST = (
    "tab:blue", "tab:orange", "tab:red", "tab:gray", "tab:green",
)

Record = Mapping[str, Any]


# ------------------------------------------------------------------------------------ helpers


def _metric_names(metric: str) -> tuple[str, str, str]:
    """(short name for titles, long name for axes, unit) of a metric column."""
    if metric in _METRICS:
        return _METRICS[metric]
    if metric.endswith("_tok_s"):
        base = metric[: -len("_tok_s")].replace("_", " ")
        return f"{base} tok/s", f"{base} throughput", "tok/s"
    if metric.endswith("_ms"):
        base = metric[: -len("_ms")].replace("_", " ")
        return f"{base} ms", f"{base} time", "ms"
    if metric.endswith("_s"):
        base = metric[: -len("_s")].replace("_", " ")
        return f"{base} s", f"{base} time", "s"
    name = metric.replace("_", " ")
    return name, name, ""


def _axis_label(long: str, unit: str) -> str:
    return f"{long} ({unit})" if unit else long


def _maximize_default(metric: str) -> bool:
    """Throughputs are maximised; times (``*_s``, ``*_ms``) and errors are minimised."""
    if metric.endswith("_tok_s"):
        return True
    return not (metric.endswith("_s") or metric.endswith("_ms") or "err" in metric or "kl" in metric)


def _state(r: Record) -> str:
    s = str(r.get("state") or "").upper()
    return s.split(".", 1)[1] if s.startswith("TRIALSTATE.") else s


def _num(v: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN / inf values."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _is_infeasible(r: Record) -> bool:
    st = _state(r)
    return st == "INFEASIBLE" or (st == "COMPLETE" and r.get("fidelity_passed") is False)


def _is_feasible(r: Record) -> bool:
    """COMPLETE and not known to violate fidelity (None = not checked, counted as feasible)."""
    return _state(r) == "COMPLETE" and r.get("fidelity_passed") is not False


def _fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _sort_key(v: Any) -> tuple[int, float, str]:
    f = _num(v)
    return (0, f, "") if f is not None else (1, 0.0, str(v))


def _new_figure(width: float = 8.0, height: float = 5.0, nrows: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=nrows > 1, squeeze=False)[:, 0]
    return fig, list(axes)


def _no_data(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, f"no data\n{why}", transform=ax.transAxes, ha="center", va="center",
            fontsize=12, color="dimgray",
            bbox={"boxstyle": "round", "facecolor": "whitesmoke", "edgecolor": "lightgray"})
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, out_path: str | Path) -> Path:
    """Render in memory, then replace the file atomically: a full disk never leaves a truncated PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return write_bytes_atomic(out_path, buf.getvalue())


# ------------------------------------------------------------------------------ Pareto front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when both coordinates are maximised.

    A point is dominated when another is >= in both coordinates and > in one. Duplicates of a front
    point are all kept; points with NaN/inf/None coordinates are ignored. The result is ordered by
    x ascending (so y descending), ready to draw as a staircase. O(n log n).
    """
    valid = [
        (i, float(p[0]), float(p[1]))
        for i, p in enumerate(points)
        if _num(p[0]) is not None and _num(p[1]) is not None
    ]
    valid.sort(key=lambda t: (-t[1], -t[2]))
    front: list[tuple[int, float, float]] = []
    best_y = -math.inf  # highest y among points with strictly larger x
    k = 0
    while k < len(valid):
        x, top = valid[k][1], valid[k][2]
        j = k
        while j < len(valid) and valid[j][1] == x:
            if valid[j][2] == top and top > best_y:
                front.append(valid[j])
            j += 1
        best_y = max(best_y, top)
        k = j
    front.sort(key=lambda t: (t[1], -t[2], t[0]))
    return [i for i, _, _ in front]


# ------------------------------------------------------------------------------------- plots


def best_by_knob(
    records: Iterable[Record], knob: str, metric: str = "decode_tok_s", maximize: bool | None = None
) -> dict[Any, tuple[float | None, int, int]]:
    """For each value of ``knob`` (sorted): (best metric over feasible COMPLETE trials or None,
    number of feasible trials with the metric, number of trials that tried the value).

    The data behind :func:`plot_best_by_knob`, separate so that it can be checked without pixels.
    """
    if maximize is None:
        maximize = _maximize_default(metric)
    best: dict[Any, float] = {}
    count: dict[Any, int] = {}
    tried: dict[Any, int] = {}
    for r in records:
        v = r.get(knob)
        if v is None:
            continue
        tried[v] = tried.get(v, 0) + 1
        m = _num(r.get(metric))
        if not _is_feasible(r) or m is None:
            continue
        count[v] = count.get(v, 0) + 1
        best[v] = m if v not in best else (max(best[v], m) if maximize else min(best[v], m))
    return {v: (best.get(v), count.get(v, 0), tried[v]) for v in sorted(tried, key=_sort_key)}


def plot_best_by_knob(
    records: Iterable[Record], knob: str, metric: str = "decode_tok_s", *, out_path: str | Path
) -> Path:
    """Bar chart: the best ``metric`` reached with each value of ``knob`` (feasible COMPLETE trials).

    Shows whether a knob matters at all (flat bars: it does not move this metric) and which value to
    keep. Values tried only by failed or infeasible trials appear as empty slots marked "none".
    """
    recs = list(records)
    short, long, unit = _metric_names(metric)
    maximize = _maximize_default(metric)
    fig, (ax,) = _new_figure(8.0, 4.8)
    ax.set_title(f"{'Best' if maximize else 'Lowest'} {short} by {knob}")
    ax.set_xlabel(_KNOB_AXIS.get(knob, knob))
    ax.set_ylabel(_axis_label(f"{'best' if maximize else 'lowest'} {long}", unit))

    table = best_by_knob(recs, knob, metric, maximize=maximize)
    values = list(table)
    best = {v: b for v, (b, _, _) in table.items() if b is not None}
    count = {v: n for v, (_, n, _) in table.items()}
    tried = {v: t for v, (_, _, t) in table.items()}

    if not best:
        why = f"no feasible completed trial with {metric}" if recs else "no trials"
        _no_data(ax, why)
        return _save(fig, out_path)

    xs = list(range(len(values)))
    heights = [best.get(v, 0.0) for v in values]
    winner = (max if maximize else min)(best.values())
    colors = [C_BEST if v in best and best[v] == winner else C_FEASIBLE for v in values]
    bars = ax.bar(xs, heights, color=colors, width=0.7)
    top = max(heights)
    for bar, v in zip(bars, values):
        if v in best:
            ax.annotate(f"{_fmt(best[v])}\nn={count[v]}/{tried[v]}",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        else:
            ax.annotate(f"none\n0/{tried[v]}", (bar.get_x() + bar.get_width() / 2, 0),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=8, color=C_INFEASIBLE)
    ax.set_xticks(xs, [str(v) for v in values], rotation=30 if len(values) > 8 else 0)
    ax.set_ylim(0, top * 1.22 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.text(0.99, 0.98, "n = feasible / tried trials; green = overall best", transform=ax.transAxes,
            ha="right", va="top", fontsize=8, color="dimgray")
    return _save(fig, out_path)


def prefill_vs_decode_figure(records: Iterable[Record]) -> Figure:
    """Scatter of prefill vs decode throughput per trial, with the Pareto front of feasible trials.

    Feasible trials are dots, the front (both maximised) a staircase through the trials no other
    beats on both; fidelity-failed trials are red crosses; trials without metrics (failed, pruned)
    sit as grey ticks on the x axis and are counted in the legend.
    """
    recs = list(records)
    fig, (ax,) = _new_figure(10.0, 5.6)
    ax.set_title("Prefill vs decode throughput per trial (Pareto front: both maximised)")
    ax.set_xlabel("prefill throughput (tok/s)")
    ax.set_ylabel("decode throughput (tok/s)")

    feas: list[tuple[float, float, Any]] = []
    infeas: list[tuple[float, float]] = []
    nometric: list[tuple[float | None, str]] = []
    for r in recs:
        x, y = _num(r.get("prefill_tok_s")), _num(r.get("decode_tok_s"))
        if x is not None and y is not None and (_is_feasible(r) or _is_infeasible(r)):
            (feas.append((x, y, r.get("number"))) if _is_feasible(r) else infeas.append((x, y)))
        else:
            nometric.append((x, _state(r) or "UNKNOWN"))

    if not feas and not infeas and not nometric:
        _no_data(ax, "no trials")
        return fig

    if not feas and not infeas:
        states: dict[str, int] = {}
        for _, st in nometric:
            states[st.lower()] = states.get(st.lower(), 0) + 1
        what = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
        _no_data(ax, f"no trial produced both metrics ({what})")
        return fig
    if feas:
        ax.scatter([p[0] for p in feas], [p[1] for p in feas], s=28, color=C_FEASIBLE, alpha=0.75,
                   label=f"feasible trials ({len(feas)})", zorder=2)
        front = pareto_front([(p[0], p[1]) for p in feas])
        fx, fy = [feas[i][0] for i in front], [feas[i][1] for i in front]
        # Boundary of the region the front dominates: from the y axis, down the steps, to the x axis.
        sx, sy = [0.0, fx[0]], [fy[0], fy[0]]
        for a, b in zip(range(len(fx) - 1), range(1, len(fx))):
            sx += [fx[a], fx[b]]
            sy += [fy[b], fy[b]]
        sx.append(fx[-1])
        sy.append(0.0)
        ax.plot(sx, sy, color=C_FRONT, linewidth=1.8, zorder=3,
                label=f"Pareto front ({len(front)} trials; #trial number)")
        ax.scatter(fx, fy, s=60, facecolors="none", edgecolors=C_FRONT, linewidths=1.8, zorder=4)
        labels = [ax.annotate(f"#{feas[i][2]}", (feas[i][0], feas[i][1]), xytext=(4, 4),
                              textcoords="offset points", fontsize=8, color="saddlebrown")
                  for i in front if feas[i][2] is not None]
    if infeas:
        ax.scatter([p[0] for p in infeas], [p[1] for p in infeas], marker="x", s=40,
                   color=C_INFEASIBLE, label=f"infeasible: fidelity failed ({len(infeas)})", zorder=2)

    known_x = [p[0] for p in feas] + [p[0] for p in infeas] + [x for x, _ in nometric if x is not None]
    if nometric:
        left = min(known_x) if known_x else 0.0
        rug_x = [x if x is not None else left for x, _ in nometric]
        states: dict[str, int] = {}
        for _, st in nometric:
            states[st.lower()] = states.get(st.lower(), 0) + 1
        what = ", ".join(f"{k} {v}" for k, v in sorted(states.items()))
        ax.scatter(rug_x, [0.0] * len(rug_x), transform=ax.get_xaxis_transform(), marker="|", s=250,
                   color=C_FAILED, clip_on=False, zorder=5,
                   label=f"no metrics ({what}):\nticks on the x axis")
    ax.set_ylim(bottom=0)
    ax.set_xlim(0, max(known_x) * 1.05 if known_x and max(known_x) > 0 else None)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    if feas:
        _separate_labels(fig, labels)
    return fig


def plot_prefill_vs_decode(records: Iterable[Record], out_path: str | Path) -> Path:
    """:func:`prefill_vs_decode_figure` as a PNG."""
    return _save(prefill_vs_decode_figure(records), out_path)


def _separate_labels(fig: Figure, labels: list[Any]) -> None:
    """Move trial-number labels up, one label height at a time, until none overlaps another."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # lay out the axes so that the labels' extents are final
    placed: list[Any] = []
    for label in labels:
        for _ in range(len(labels) + 1):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = label.xyann
            label.xyann = (dx, dy + box.height * 72.0 / fig.dpi + 1.0)
        placed.append(label.get_window_extent(renderer))


def plot_history(
    records: Iterable[Record], metric: str, out_path: str | Path, maximize: bool | None = None
) -> Path:
    """``metric`` of each trial by trial number, with the running best of feasible trials.

    Tells whether the search is still improving. ``maximize`` defaults from the metric's name
    (throughputs up, times down). Infeasible trials are red crosses, trials without the metric grey
    ticks on the x axis.
    """
    recs = sorted(list(records), key=lambda r: (_num(r.get("number")) is None, _num(r.get("number")) or 0))
    short, long, unit = _metric_names(metric)
    if maximize is None:
        maximize = _maximize_default(metric)
    fig, (ax,) = _new_figure(8.5, 4.8)
    ax.set_title(f"{short.capitalize()} per trial and running best "
                 f"({'higher' if maximize else 'lower'} is better)")
    ax.set_xlabel("trial number")
    ax.set_ylabel(_axis_label(long, unit))

    fx, fy, ix, iy, nx = [], [], [], [], []
    run_x, run_y = [], []
    best: float | None = None
    for pos, r in enumerate(recs):
        n = _num(r.get("number"))
        n = float(pos) if n is None else n
        m = _num(r.get(metric))
        if m is None or not (_is_feasible(r) or _is_infeasible(r)):
            nx.append(n)
            continue
        if _is_infeasible(r):
            ix.append(n)
            iy.append(m)
            continue
        fx.append(n)
        fy.append(m)
        best = m if best is None else (max(best, m) if maximize else min(best, m))
        run_x.append(n)
        run_y.append(best)

    if not recs:
        _no_data(ax, "no trials")
        return _save(fig, out_path)
    if not fx and not ix:
        _no_data(ax, f"no trial produced {metric} (failed/pruned: {len(nx)})")
        return _save(fig, out_path)
    if fx:
        ax.scatter(fx, fy, s=24, color=C_FEASIBLE, alpha=0.8, label=f"feasible trials ({len(fx)})",
                   zorder=2)
        last = max([*fx, *ix, *nx])
        ax.step([*run_x, last], [*run_y, run_y[-1]], where="post", color=C_BEST, linewidth=2,
                label=f"running best (final {_fmt(run_y[-1])}{' ' + unit if unit else ''})", zorder=3)
    if ix:
        ax.scatter(ix, iy, marker="x", s=36, color=C_INFEASIBLE,
                   label=f"infeasible: fidelity failed ({len(ix)})", zorder=2)
    if nx:
        ax.scatter(nx, [0.0] * len(nx), transform=ax.get_xaxis_transform(), marker="|", s=250,
                   color=C_FAILED, clip_on=False, zorder=5,
                   label=f"no {metric} (failed/pruned: {len(nx)})")
    all_x = [*fx, *ix, *nx]
    ax.set_xlim(min(all_x) - 0.5, max(all_x) + 0.5)  # the rug's transform does not autoscale x
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if maximize:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    return _save(fig, out_path)


def plot_param_importances(
    importances: Mapping[str, float], out_path: str | Path, metric: str | None = None
) -> Path:
    """Horizontal bars of knob importances (computed elsewhere, e.g. optuna.importance), largest on top.

    Tells where further tuning effort pays off; a knob near zero did not move ``metric``.
    """
    items = [(k, float(v)) for k, v in importances.items() if _num(v) is not None]
    items.sort(key=lambda kv: kv[1])
    fig, (ax,) = _new_figure(7.5, max(3.0, 0.45 * len(items) + 1.6))
    what = f" for {_metric_names(metric)[0]}" if metric else ""
    ax.set_title(f"Knob importance{what}")
    ax.set_xlabel("importance (normalised: the knobs sum to 1; unitless)")
    ax.set_ylabel("knob")
    if not items:
        _no_data(ax, "no importances (too few completed trials?)")
        return _save(fig, out_path)
    ys = list(range(len(items)))
    ax.barh(ys, [v for _, v in items], color=C_FEASIBLE, height=0.6)
    ax.set_yticks(ys, [k for k, _ in items])
    top = max(v for _, v in items)
    for y, (_, v) in zip(ys, items):
        ax.annotate(f"{v:.3f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_xlim(0, top * 1.15 if top > 0 else 1.0)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, out_path)


def _read_stats_csv(path: Path) -> dict[str, list[float]]:
    if not path.is_file():
        raise UserError(f"decode stats file {str(path)!r} does not exist; pass the --stats-log CSV of a run")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in _STATS_COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{path} lacks column(s) {', '.join(missing)}; expected a --stats-log CSV with header "
                f"{','.join(_STATS_COLUMNS)}"
            )
        cols: dict[str, list[float]] = {c: [] for c in _STATS_COLUMNS}
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): v for k, v in row.items()}
            for c in _STATS_COLUMNS:
                try:
                    cols[c].append(float(row[c]))
                except (TypeError, ValueError):
                    raise UserError(
                        f"{path}:{lineno}: column {c} is not a number ({row.get(c)!r}); "
                        "fix or regenerate the --stats-log CSV"
                    ) from None
    return cols


def decode_steps_figure(stats_csv_path: str | Path) -> Figure:
    """Two panels over decode step: time per step (ms), and instantaneous / average tok/s.

    Shows warm-up and compilation spikes, drift (thermal throttling, memory pressure) and how fast
    the average settles. A step-time panel with spikes over 10x the median switches to a log scale.
    """
    path = Path(stats_csv_path)
    cols = _read_stats_csv(path)
    fig, (ax_dt, ax_tp) = _new_figure(8.5, 6.0, nrows=2)
    fig.suptitle(f"Decode steps of {path.name}: time per step and throughput")
    ax_dt.set_ylabel("step time (ms)")
    ax_tp.set_ylabel("throughput (tok/s)")
    ax_tp.set_xlabel("decode step")
    steps = cols["step"]
    if not steps:
        _no_data(ax_dt, "the CSV has no rows")
        _no_data(ax_tp, "the CSV has no rows")
        return fig
    marker = "o" if len(steps) <= 60 else None
    dt = cols["dt_ms"]
    ax_dt.plot(steps, dt, color=C_FEASIBLE, marker=marker, markersize=3, linewidth=1,
               label="time per step")
    positive = sorted(v for v in dt if v > 0)
    if positive:
        median = positive[len(positive) // 2]
        ax_dt.axhline(median, color=C_BEST, linestyle="--", linewidth=1,
                      label=f"median {_fmt(median)} ms")
        if max(positive) > 10 * median and min(dt) > 0:
            ax_dt.set_yscale("log")
            ax_dt.set_ylabel("step time (ms, log scale)")
    ax_dt.legend(loc="upper right", fontsize=8)
    ax_dt.grid(alpha=0.3)
    ax_tp.plot(steps, cols["inst_tok_s"], color=C_FEASIBLE, alpha=0.6, linewidth=1,
               marker=marker, markersize=3, label="instantaneous (1 / step time)")
    ax_tp.plot(steps, cols["avg_tok_s"], color=C_FRONT, linewidth=2,
               label=f"running average (final {_fmt(cols['avg_tok_s'][-1])} tok/s)")
    ax_tp.set_ylim(bottom=0)
    ax_tp.legend(loc="lower right", fontsize=8)
    ax_tp.grid(alpha=0.3)
    return fig


def plot_decode_steps(stats_csv_path: str | Path, out_path: str | Path) -> Path:
    """:func:`decode_steps_figure` as a PNG."""
    return _save(decode_steps_figure(stats_csv_path), out_path)


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "stats"


def plot_all(
    records: Iterable[Record],
    out_dir: str | Path,
    importances: Mapping[str, float] | None = None,
    stats_csvs: Iterable[str | Path] | None = None,
    *,
    importance_metric: str | None = None,
) -> list[Path]:
    """Every standard plot of a study into ``out_dir``; returns the written paths in a stable order.

    Best-by-knob bars for decode and prefill throughput over all seven knobs, the prefill/decode
    Pareto scatter, both histories, the importances when given and one decode-step figure per CSV.
    """
    recs = list(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for metric in ("decode_tok_s", "prefill_tok_s"):
        for knob in KNOBS:
            paths.append(plot_best_by_knob(recs, knob, metric, out_path=out / f"best_{metric}_by_{knob}.png"))
    paths.append(plot_prefill_vs_decode(recs, out / "prefill_vs_decode.png"))
    for metric in ("decode_tok_s", "prefill_tok_s"):
        paths.append(plot_history(recs, metric, out / f"history_{metric}.png"))
    if importances is not None:
        paths.append(plot_param_importances(importances, out / "param_importances.png",
                                            metric=importance_metric))
    used: set[str] = set()
    for csv_path in stats_csvs or ():
        stem = _safe_stem(Path(csv_path).stem)
        name, k = f"decode_steps_{stem}.png", 2
        while name in used:
            name, k = f"decode_steps_{stem}_{k}.png", k + 1
        used.add(name)
        paths.append(plot_decode_steps(csv_path, out / name))
    return paths
