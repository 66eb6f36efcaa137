"""report.md: one readable page per study — what won, by how much, and whether answers stayed the same.

The study's files (trials.jsonl, summary.csv, best.json) are complete but not a summary. The report
answers the questions a user opens a study with: which configurations are fastest for decode and for
prefill, how much faster than the default configuration, did every tuned configuration keep the
model's answers (fidelity), does the generated text look sane (text metrics, judge scores), plus the
plots and the exported best.json. It is plain Markdown with relative image links, so it renders in a
repository browser, an IDE, or as an MLflow artifact next to its plots.

Inputs are plain trial records (the dicts of trials.jsonl); field names follow the study layer's
records, with the alternatives listed in :func:`write_report` accepted so a renamed field degrades to
"not recorded" rather than an exception.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from xlstm_tune.atomic_files import write_text_atomic
from xlstm_tune.quality.plots import KNOBS, _is_feasible, _num, _state

__all__ = ["REPORT_NAME", "TOP_N", "write_report"]

REPORT_NAME = "report.md"
TOP_N = 5

Record = Mapping[str, Any]

# Field lookups: the first name present wins; ("fidelity", "rel_err") means record["fidelity"]["rel_err"].
_FIDELITY_FIELDS: dict[str, tuple[Any, ...]] = {
    "rel_err": ("fidelity_rel_err", "rel_err", ("fidelity", "rel_err")),
    "max_rel_err": ("fidelity_max_rel_err", "max_rel_err", ("fidelity", "max_rel_err")),
    "kl_max": ("fidelity_kl_max", "kl_max", ("fidelity", "kl_max")),
    "kl_mean": ("fidelity_kl_mean", "kl_mean", ("fidelity", "kl_mean")),
    "greedy_agreement": ("fidelity_greedy_agreement", "greedy_agreement", ("fidelity", "greedy_agreement")),
}
_TEXT_FIELDS = ("distinct_1", "distinct_2", "distinct_3", "repetition_rate", "perplexity")
_JUDGE_FIELDS = ("judge_coherence", "judge_relevance", "judge_fluency", "judge_overall")
_SPEED = {"decode_tok_s": "decode", "prefill_tok_s": "prefill"}


# ---- small helpers ------------------------------------------------------------------------------
def _lookup(record: Record, names: Iterable[Any]) -> float | None:
    for name in names:
        if isinstance(name, tuple):
            inner = record.get(name[0])
            value = inner.get(name[1]) if isinstance(inner, Mapping) else None
        else:
            value = record.get(name)
        if _num(value) is not None:
            return _num(value)
    return None


def _text_value(record: Record, name: str) -> float | None:
    return _lookup(record, (name, f"quality_{name}", f"text_{name}", f"continuation_{name}",
                            ("quality", name), ("text_metrics", name)))


def _fmt(value: Any, digits: int = 3) -> str:
    """Numbers readable in a table: thousands separators for big ones, 3 significant-ish digits else."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.1f}"
        if a == 0 or a >= 0.01:
            return f"{value:.{digits}g}" if a < 1 else f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else _fmt(value)
    return " ".join(text.split()).replace("|", "\\|") or "—"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fence(text: str, lang: str = "") -> list[str]:
    """A code fence longer than any backtick run inside ``text`` (so the text cannot close it)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence]


def _link_target(path: Path, base: Path) -> str:
    rel = os.path.relpath(path.resolve(), base.resolve()).replace(os.sep, "/")
    return f"<{rel}>" if re.search(r"[\s()<>]", rel) else rel


# ---- sections -----------------------------------------------------------------------------------
def _find_default(records: Sequence[Record], default_record: Record | None) -> Record | None:
    if default_record is not None:
        return default_record
    return next((r for r in records if r.get("is_default") is True), None)


def _speedup(record: Record, metric: str, default: Record | None) -> float | None:
    """record's metric / default's metric; else the record's own ``speedup_vs_default`` field.

    ``speedup_vs_default`` may be a number (taken as is) or a mapping keyed by the metric
    (``decode_tok_s``) or its short name (``decode``).
    """
    base = _num(default.get(metric)) if default is not None else None
    value = _num(record.get(metric))
    if base is not None and base > 0 and value is not None:
        return value / base
    recorded = record.get("speedup_vs_default")
    if isinstance(recorded, Mapping):
        return _lookup(recorded, (metric, _SPEED.get(metric, metric)))
    return _num(recorded)


def _with_spread(record: Record, metric: str) -> str:
    value = _num(record.get(metric))
    if value is None:
        return "—"
    text = _fmt(value)
    p20, p80 = _num(record.get(f"{metric}_p20")), _num(record.get(f"{metric}_p80"))
    if p20 is not None and p80 is not None:
        text += f" ({_fmt(p20)}–{_fmt(p80)})"
    cv = _num(record.get(f"{metric}_cv"))
    if cv is not None:
        text += f", cv {cv * 100:.1f}%"
    return text


def _knob_columns(records: Sequence[Record]) -> list[str]:
    """The knob fields of the records: the canonical values that ran (never the sampler's raw params)."""
    return [k for k in KNOBS if any(k in r for r in records)]


def _context_lens(records: Sequence[Record]) -> list[int]:
    lens = {int(n) for r in records for n in (r.get("context_lens") or []) if isinstance(n, int)}
    return sorted(lens)


def _has_spread(records: Sequence[Record], metric: str) -> bool:
    return any(_num(r.get(f"{metric}_p20")) is not None for r in records)


def _top_section(records: Sequence[Record], metric: str, default: Record | None) -> list[str]:
    other = "prefill_tok_s" if metric == "decode_tok_s" else "decode_tok_s"
    name = _SPEED[metric]
    lines = [f"## Top configurations by {name} throughput", ""]
    # A trial answered from an identical configuration's measurement (`duplicate_of`) would list the same
    # configuration twice: rank each measured configuration once.
    feasible = [r for r in records if _is_feasible(r) and _num(r.get(metric)) is not None
                and r.get("duplicate_of") is None]
    if not feasible:
        return lines + [f"No feasible completed trial measured {metric}.", ""]
    feasible.sort(key=lambda r: -float(_num(r.get(metric)) or 0.0))
    top = feasible[:TOP_N]
    knobs = _knob_columns(records)
    judged = any(_num(r.get("judge_overall")) is not None for r in top)
    # Prefill is ranked by the geometric mean over the context lengths (it has no spread of its own);
    # each length's median and spread get their own column.
    lens = _context_lens(top) if metric == "prefill_tok_s" else []
    main = f"{name} tok/s" + (f", geometric mean over contexts {', '.join(map(str, lens))}" if len(lens) > 1 else "")
    if _has_spread(top, metric):
        main += " (p20–p80, cv)"
    per_len = [f"prefill_tok_s_ctx{n}" for n in lens]
    header = ["rank", "trial", *knobs, main,
              *[f"ctx {n} tok/s" + (" (p20–p80, cv)" if _has_spread(top, m) else "") for n, m in zip(lens, per_len)],
              "speed-up vs default", f"{_SPEED[other]} tok/s"] + (["judge overall"] if judged else [])
    rows = []
    for rank, r in enumerate(top, start=1):
        speed = _speedup(r, metric, default)
        is_default = r is default or r.get("is_default") is True
        trial = f"{r.get('number')} (default)" if is_default else r.get("number")
        row = [rank, trial, *[r.get(k) for k in knobs], _with_spread(r, metric),
               *[_with_spread(r, m) for m in per_len],
               f"{speed:.2f}×" if speed is not None else "—", _num(r.get(other))]
        if judged:
            row.append(r.get("judge_overall") if _num(r.get("judge_overall")) is not None else None)
        rows.append(row)
    lines += _table(header, rows)
    lines += ["", f"Feasible trials: completed and not failing the fidelity check "
                  f"({len(feasible)} with {metric}); spread is the p20–p80 range of the repeats. Speed-ups "
                  f"here are one trial's figure over the default's; the confirmed ones, with intervals, are "
                  f"under Confirmation.", ""]
    return lines


def _interval(est: Any) -> str:
    """`1.84× [1.62–2.10] wins`: a confirmed speed-up, its interval and the verdict."""
    if not isinstance(est, Mapping) or _num(est.get("speedup")) is None:
        return "—"
    text = f"{est['speedup']:.2f}×"
    if _num(est.get("low")) is not None and _num(est.get("high")) is not None:
        text += f" [{est['low']:.2f}–{est['high']:.2f}]"
    return f"{text} {est.get('verdict') or ''}".rstrip()


def _confirmation_section(best: Mapping[str, Any] | None) -> list[str]:
    """Per context length: the winner (or that the default stays, and why), both phases with intervals."""
    lines = ["## Confirmation", ""]
    contexts = [c for c in (best or {}).get("contexts", []) if isinstance(c, Mapping)]
    confirmed = [c for c in contexts if isinstance(c.get("confirmation"), Mapping)]
    if not confirmed:
        return lines + ["No confirmation round recorded in best.json.", ""]
    conf0 = confirmed[0]["confirmation"]
    lines += [f"Candidates re-measured against the default in {conf0.get('paired_rounds', 0)} paired round(s); "
              f"speed-up = geometric mean of the per-round ratios, with its "
              f"{float(conf0.get('confidence', 0.95)):.0%} interval (bootstrap and Student t envelope). "
              f"A winner wins on a phase (interval above 1) and loses no phase beyond "
              f"max_trade = {float(conf0.get('max_trade', 0)):g}.", ""]
    rows = []
    for c in confirmed:
        conf = c["confirmation"]
        won = c.get("winner") is True
        who = f"trial {c.get('trial_number')}" if won else "default (no winner)"
        shown = "" if won else (f"closest: trial {conf.get('trial_number')}" if conf.get("key") else "")
        rows.append([c.get("context_len"), who, _interval(conf.get("prefill")), _interval(conf.get("decode")),
                     c.get("reason") or shown or "—"])
    lines += _table(["context", "chosen", "prefill speed-up [interval] verdict",
                     "decode speed-up [interval] verdict", "why"], rows)
    return lines + ["", "For a context without a winner the figures are the closest candidate's; the default "
                        "is exported (`\"winner\": false`).", ""]


def _default_section(records: Sequence[Record], default: Record | None) -> list[str]:
    lines = ["## Default configuration", ""]
    if default is None:
        if any(r.get("speedup_vs_default") is not None for r in records):
            return lines + ["No default record given; speed-ups are the `speedup_vs_default` values the "
                            "study recorded.", ""]
        return lines + ["No default configuration was measured (no record with `is_default: true`), so "
                        "speed-ups are not available. Measure the default in the same study to get them.", ""]
    knobs = _knob_columns([default])
    rows = [[default.get("number"), *[default.get(k) for k in knobs],
             _with_spread(default, "decode_tok_s"), _with_spread(default, "prefill_tok_s")]]
    lines += _table(["trial", *knobs, "decode tok/s", "prefill tok/s"], rows)
    return lines + ["", "Speed-ups below divide a trial's median by this configuration's median.", ""]


def _fidelity_section(records: Sequence[Record]) -> list[str]:
    lines = ["## Fidelity", ""]
    checked = [r for r in records if isinstance(r.get("fidelity_passed"), bool)]
    passed = sum(1 for r in checked if r["fidelity_passed"])
    if checked:
        lines.append(f"- Checked trials: {len(checked)}; passed: {passed} "
                     f"({100.0 * passed / len(checked):.1f}%); failed: {len(checked) - passed}.")
    else:
        lines.append("- No trial recorded a fidelity verdict (`fidelity_passed`).")
    for key, label, worst_is_max in (
        ("rel_err", "relative logit error ‖out−ref‖/‖ref‖", True),
        ("max_rel_err", "worst-position relative error", True),
        ("kl_max", "KL(ref‖out), worst position", True),
        ("kl_mean", "KL(ref‖out), mean over positions", True),
        ("greedy_agreement", "greedy-token agreement", False),
    ):
        values = [(v, r.get("number"), r.get("fidelity_passed") is True) for r in records
                  if (v := _lookup(r, _FIDELITY_FIELDS[key])) is not None]
        if values:
            pick = max if worst_is_max else min
            v, n, _ = pick(values, key=lambda t: t[0])
            line = f"- Worst {label}: {_fmt(v)} (trial {n}; over {len(values)} trial(s))"
            ok = [t for t in values if t[2]]
            if ok and len(ok) < len(values):  # what the configurations that may be used reach
                v, n, _ = pick(ok, key=lambda t: t[0])
                line += f"; among passing trials: {_fmt(v)} (trial {n})"
            lines.append(line + ".")
    failed = [r.get("number") for r in checked if not r["fidelity_passed"]]
    if failed:
        shown = ", ".join(str(n) for n in failed[:20]) + (" …" if len(failed) > 20 else "")
        lines.append(f"- Trials that failed fidelity (excluded from the top tables): {shown}.")
    return lines + [""]


def _stats_rows(records: Sequence[Record], names: Sequence[str], getter: Any) -> list[list[Any]]:
    rows = []
    for name in names:
        vals = [v for r in records if (v := getter(r, name)) is not None]
        if vals:
            rows.append([name, len(vals), sum(vals) / len(vals), min(vals), max(vals)])
    return rows


def _quality_section(records: Sequence[Record]) -> list[str]:
    lines = ["## Quality of the generated text", ""]
    feasible = [r for r in records if _is_feasible(r)]
    text_rows = _stats_rows(feasible, _TEXT_FIELDS, _text_value)
    if text_rows:
        lines += ["Text metrics of the feasible trials' continuations (distinct-n: unique/total "
                  "n-grams, higher is more varied; repetition: repeated 4-grams, lower is better; "
                  "perplexity under the reference path):", ""]
        lines += _table(["metric", "trials", "mean", "min", "max"], text_rows) + [""]
    else:
        lines += ["No text metrics recorded.", ""]
    judge_rows = _stats_rows(feasible, _JUDGE_FIELDS, lambda r, k: _num(r.get(k)))
    if judge_rows:
        judges = sorted({str(r["judge"]) for r in feasible if r.get("judge")})
        invalid = sum(1 for r in feasible if r.get("judge_valid") is False)
        lines += [f"Judge scores (1–10) of the feasible trials"
                  f"{' by ' + ', '.join(judges) if judges else ''}"
                  f"{f'; {invalid} invalid answer(s) not counted' if invalid else ''}:", ""]
        lines += _table(["score", "trials", "mean", "min", "max"], judge_rows) + [""]
    else:
        lines += ["No judge scores (run `python -m xlstm_tune judge --study NAME` to add them).", ""]
    return lines


def _plot_title(stem: str) -> str:
    """A heading for ``plot_all``'s file names (others: the name with spaces)."""
    names = {"decode_tok_s": "decode tok/s", "prefill_tok_s": "prefill tok/s"}
    if m := re.fullmatch(r"best_(\w+?_tok_s)_by_(\w+)", stem):
        return f"Best {names.get(m[1], m[1])} by {m[2]}"
    if m := re.fullmatch(r"history_(\w+)", stem):
        return f"History of {names.get(m[1], m[1])}"
    if stem == "prefill_vs_decode":
        return "Prefill vs decode throughput"
    if stem == "param_importances":
        return "Knob importances"
    if m := re.fullmatch(r"decode_steps_(.+)", stem):
        return f"Decode steps of {m[1]}"
    return stem.replace("_", " ")


def _plots_section(study_dir: Path, plots: Iterable[str | Path]) -> list[str]:
    lines = ["## Plots", ""]
    existing = [Path(p) for p in plots if Path(p).is_file()]
    if not existing:
        return lines + ["No plots were written.", ""]
    for p in existing:
        title = _plot_title(p.stem)
        lines += [f"### {title}", "", f"![{title}]({_link_target(p, study_dir)})", ""]
    return lines


def _read_best(best_path: str | Path | None) -> tuple[str | None, Any]:
    """(raw text, parsed JSON or None) of best.json; (None, None) when there is none."""
    if best_path is None or not Path(best_path).is_file():
        return None, None
    raw = Path(best_path).read_text(encoding="utf-8", errors="replace")
    try:
        return raw, json.loads(raw)
    except json.JSONDecodeError:
        return raw, None


def _best_section(best_path: str | Path | None) -> list[str]:
    lines = ["## best.json", ""]
    raw, data = _read_best(best_path)
    if raw is None:
        return lines + ["No best.json was written (no feasible trial, or the export did not run).", ""]
    path = Path(best_path)  # type: ignore[arg-type]
    if data is None:
        return lines + [f"`{path.name}` is not valid JSON; shown as stored:", "", *_fence(raw), ""]
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return lines + [f"`{path.name}` (load it with `RuntimeOptions.from_best(path)` or `--best`):", "",
                    *_fence(text, "json"), ""]


def _time_section(split: Mapping[str, Any] | None) -> list[str]:
    """The study's time split (computed by the study, kept in run_meta.json as `time_split`)."""
    if not split or not split.get("rows"):
        return []
    lines = ["## Where the time went", ""]
    lines += _table(["part", "seconds", "share"], [[r[0], f"{float(r[1]):,.1f}", f"{float(r[2]):.1f}%"]
                                                   for r in split["rows"]])
    rate = split.get("trials_per_min")
    lines += ["", f"{split.get('trials', 0)} trials ran ({split.get('complete', 0)} complete, "
                  f"{split.get('pruned_trials', 0)} pruned, {split.get('failed_trials', 0)} failed) in "
                  f"{float(split.get('total_s') or 0):,.1f} s" + (f": {float(rate):.2f} trials per minute." if rate else "."),
              ""]
    return lines


def _origin_section(records: Sequence[Record]) -> list[str]:
    """Trials that did not come from the sampler: the default, enqueued hints, warm starts."""
    seeded = [r for r in records if r.get("origin")]
    if not seeded:
        return []
    lines = ["## Where the first trials came from", ""]
    rows = [[r.get("number"), r.get("origin"), r.get("state"), _fmt(r.get("prefill_tok_s")), _fmt(r.get("decode_tok_s"))]
            for r in sorted(seeded, key=lambda r: int(r.get("number") or 0))]
    lines += _table(["trial", "origin", "state", "prefill tok/s", "decode tok/s"], rows)
    return lines + ["", "Every other trial was proposed by the sampler.", ""]


# ---- entry point --------------------------------------------------------------------------------
def write_report(
    study_dir: str | Path,
    records: Iterable[Record],
    best_path: str | Path | None,
    plots: Iterable[str | Path],
    default_record: Record | None = None,
    *,
    notes: Sequence[str] = (),
    time_split: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<study_dir>/report.md`` atomically and return its path.

    Args:
        study_dir: the study folder; the report goes there and plot links are relative to it.
        records: trial records (trials.jsonl dicts, judge columns merged in if judged). Used fields:
            ``number``, ``state``, the knobs, ``decode_tok_s``/``prefill_tok_s`` (+ ``_p20``, ``_p80``,
            ``_cv``), ``fidelity_passed``, fidelity errors (``fidelity_rel_err`` or ``rel_err``,
            ``fidelity_kl_max`` or ``kl_max``, ... or a nested ``fidelity`` dict), text metrics
            (``distinct_1``..``_3``, ``repetition_rate``, ``perplexity``; ``quality_`` prefix or a
            nested ``quality`` dict also accepted), ``judge_*`` scores, ``is_default``,
            ``speedup_vs_default``.
        best_path: the exported best.json (embedded verbatim, pretty-printed); None or missing: said so.
        plots: image files to embed (missing files are skipped), e.g. ``plot_all``'s return value.
        default_record: the default configuration's measurement; when None, the record flagged
            ``is_default: true`` is used; without either, a record's own ``speedup_vs_default`` is shown.
        notes: extra lines for a closing "Notes" section (e.g. why importances were skipped).
        time_split: the study's time split (run_meta.json `time_split`: `rows` of part, seconds, share;
            `trials`, `trials_per_min`, ...), shown as "Where the time went"; None: no such section.

    Never raises for missing or odd fields: a report must be writable at the end of any study.
    """
    root = Path(study_dir)
    recs = list(records)
    default = _find_default(recs, default_record)
    states: dict[str, int] = {}
    for r in recs:
        st = _state(r) or "UNKNOWN"
        states[st] = states.get(st, 0) + 1
    n_feasible = sum(1 for r in recs if _is_feasible(r))

    lines = [f"# Study `{root.name}`", "",
             f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}. "
             f"Trials: {len(recs)}"
             + (" (" + ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items())) + ")" if recs else "")
             + f"; feasible: {n_feasible}.", ""]
    best = _read_best(best_path)[1]
    lines += _confirmation_section(best if isinstance(best, Mapping) else None)
    lines += _default_section(recs, default)
    lines += _top_section(recs, "decode_tok_s", default)
    lines += _top_section(recs, "prefill_tok_s", default)
    lines += _fidelity_section(recs)
    lines += _time_section(time_split)
    lines += _origin_section(recs)
    lines += _quality_section(recs)
    lines += _plots_section(root, plots)
    lines += _best_section(best_path)
    if notes:
        lines += ["## Notes", "", *[f"- {' '.join(str(n).split())}" for n in notes], ""]
    return write_text_atomic(root / REPORT_NAME, "\n".join(lines).rstrip("\n") + "\n")
