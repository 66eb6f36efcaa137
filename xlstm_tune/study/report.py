"""The end-of-study summary: best configurations, their speed-up over the default, where every file is."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from xlstm_tune.runtime.options import KNOBS
from xlstm_tune.study.significance import fmt_interval


def _fmt_rate(v: Any) -> str:
    if v is None:
        return "-"
    return f"{float(v):,.0f}" if float(v) >= 100 else f"{float(v):,.1f}"


def _fmt_x(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return out


def counts_line(records: Sequence[Mapping[str, Any]]) -> str:
    states = Counter(r.get("state") for r in records)
    infeasible = sum(1 for r in records if r.get("state") == "COMPLETE" and not r.get("feasible"))
    dupes = sum(1 for r in records if r.get("state") == "COMPLETE" and r.get("duplicate_of") is not None)
    reasons = Counter(r.get("failure_reason") for r in records if r.get("state") in ("FAIL", "PRUNED"))
    parts = [f"{states.get('COMPLETE', 0)} complete"]
    if infeasible:
        parts[-1] += f" ({infeasible} infeasible: fidelity)"
    if dupes:
        parts.append(f"{dupes} answered from an identical configuration")
    fails = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: str(kv[0])))
    parts.append(f"{states.get('FAIL', 0)} failed, {states.get('PRUNED', 0)} pruned" + (f" ({fails})" if fails else ""))
    return "Trials: " + "; ".join(parts)


def _vs(est: Mapping[str, Any] | None) -> str:
    """`1.84x [1.62-2.10] wins`: the paired speed-up, its interval and the verdict."""
    return "-" if not est else f"{fmt_interval(est)} {est.get('verdict', '')}".rstrip()


def _knob_line(k: Mapping[str, Any]) -> str:
    return " ".join(f"{name}={k.get(name)}" for name in KNOBS)


def _confirmation_lines(conf: Mapping[str, Any]) -> list[str]:
    """Every confirmed candidate against the default, per phase: speed-up [interval] verdict."""
    cands = conf.get("configs", [])[1:]
    if not cands:
        return []
    rule = conf.get("rule") or {}
    lens = list(conf["configs"][0].get("prefill", {}))
    lines = ["", f"Confirmation: {conf.get('paired_rounds', 0)} paired round(s); speed-up over the default "
                 f"[{float(rule.get('confidence', 0.95)):.0%} interval] and verdict "
                 f"(max_trade {float(rule.get('max_trade', 0.0)):g}, at least {rule.get('min_rounds', 3)} rounds):"]
    rows = []
    for e in cands:
        paired = e.get("paired") or {}
        fid = e.get("fidelity") or {}
        status = "error" if e.get("error") else ("ok" if fid.get("passed") else "fidelity failed")
        changed = {k: v for k, v in e["knobs"].items() if conf["configs"][0]["knobs"].get(k) != v}
        rows.append([f"#{e['trials'][0]}" if e.get("trials") else e["key"][:12],
                     " ".join(f"{k}={v}" for k, v in changed.items()) or "(as the default)",
                     *[_vs((paired.get("prefill") or {}).get(n)) for n in lens], _vs(paired.get("decode")), status])
    return lines + _table(["trial", "knobs unlike the default", *[f"prefill {n}" for n in lens], "decode", "fidelity"],
                          rows)


def time_section(split_lines: Sequence[str]) -> list[str]:
    """The study's time split (study.timesplit.render_lines), under its own heading."""
    return ["", "Where the time went:", *split_lines] if split_lines else []


def render(summary: Mapping[str, Any]) -> str:
    """Text for stdout. `summary` keys: study, contexts (best.json entries), default, confirmation (the
    round's summary), records, paths, notes. Knob values are the canonical ones (what ran)."""
    lines: list[str] = []
    lines.append(f"Study {summary['study']!r}: {summary.get('headline', '')}".rstrip())
    lines.append(counts_line(summary.get("records", [])))
    contexts = summary.get("contexts") or []
    if contexts:
        lines.append("")
        lines.append(f"Best configuration per context length ({summary.get('confirm_note', 'confirmed')}):")
        rows = []
        for c in contexts:
            k, m = c["knobs"], c["metrics"]
            pre, dec = m.get("prefill_tok_s") or {}, m.get("decode_tok_s") or {}
            conf = c.get("confirmation") or {}
            winner = c.get("winner", not c.get("is_default"))
            rows.append([
                str(c["context_len"]),
                f"#{c.get('trial_number')}" if winner else "default (no winner)",
                k["backend"], str(k["chunk_size"]), str(k["heads_per_band"]), str(k["workers"]), str(k["t_inner"]),
                str(k["streams"]), k["decode_mode"],
                _fmt_rate(pre.get("median")), _vs(conf.get("prefill")) if winner else "1.00x",
                _fmt_rate(dec.get("median")), _vs(conf.get("decode")) if winner else "1.00x",
                f"{(c.get('fidelity') or {}).get('rel_err', float('nan')):.1e}",
            ])
        lines += _table(["context", "chosen", "backend", "chunk", "hpb", "workers", "t_inner", "streams", "decode",
                         "prefill tok/s", "vs default", "decode tok/s", "vs default", "rel_err"], rows)
        for c in contexts:
            if not c.get("winner", not c.get("is_default")) and c.get("reason"):
                lines.append(f"No winner at context {c['context_len']}: {c['reason']}")
        d = summary.get("default")
        if d:
            lines.append(f"Default configuration: {_knob_line(d['knobs'])}")
    elif summary.get("no_best_reason"):
        lines.append("")
        lines.append(f"No best configuration: {summary['no_best_reason']}")
    if summary.get("confirmation"):
        lines += _confirmation_lines(summary["confirmation"])
    lines += time_section(summary.get("time_split_lines") or [])
    for note in summary.get("notes", []):
        lines.append(f"Note: {note}")
    lines.append("")
    lines.append("Results:")
    paths = summary.get("paths", {})
    width = max((len(k) for k in paths), default=0)
    for label, value in paths.items():
        lines.append(f"  {label.ljust(width)}  {value}")
    for hint in summary.get("hints", []):
        lines.append(hint)
    return "\n".join(lines)
