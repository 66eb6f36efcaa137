"""The confirmation round: nothing is declared best on the strength of one trial's figure.

The top `top_k` feasible trials per criterion (prefill tok/s at each context length; decode tok/s) are
re-measured in one worker, interleaved with the default configuration (D, C1, D, C2, ..., the candidate
order rotating each round), so slow drift of the machine (heat, background load) hits both sides alike.
Each candidate measurement is paired with the default's measurement right before it; the speed-up is the
geometric mean of the per-round ratios with a bootstrap interval, and each phase gets a verdict (wins /
not worse / traded / worse / not enough evidence: `study.significance`). The fidelity check is repeated.

A candidate can be chosen only if it passed fidelity and is a *winner*: it wins (interval above 1) on a
phase it is chosen for and no measured phase is worse beyond `[confirm] max_trade`. Among the winners,
per context length:

    only prefill objectives   highest prefill speed-up at that length
    only decode_tok_s         highest decode speed-up
    both (Pareto study)       highest geometric mean of the two speed-ups; it must win on at least one
                              phase and be no worse on the other; ties go to the faster prefill

When no candidate wins, the default stays: its entry says `"winner": false` and why.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from xlstm_tune.bench.stats import summarize
from xlstm_tune.study.records import is_feasible, measured
from xlstm_tune.study.significance import NO_EVIDENCE, Rule, estimate, fmt_interval, is_winner


def selection_mode(objectives: Sequence[str]) -> str:
    has_prefill = any(o.startswith("prefill") for o in objectives)
    has_decode = "decode_tok_s" in objectives
    if has_prefill and has_decode:
        return "balanced"
    return "decode" if has_decode else "prefill"


def criteria(objectives: Sequence[str], context_lens: Sequence[int]) -> list[str]:
    """The metrics candidates are ranked by: per-length prefill and/or decode."""
    mode = selection_mode(objectives)
    out: list[str] = []
    if mode in ("prefill", "balanced"):
        out += [f"prefill_tok_s_ctx{n}" for n in context_lens]
    if mode in ("decode", "balanced"):
        out.append("decode_tok_s")
    return out


def select_candidates(records: Sequence[Mapping[str, Any]], ranked_by: Sequence[str], top_k: int,
                      max_candidates: int, default_key: str) -> list[dict[str, Any]]:
    """Distinct configurations to confirm: top `top_k` feasible measured trials per criterion."""
    pool = [r for r in records if is_feasible(r) and measured(r)]
    chosen: dict[str, dict[str, Any]] = {}
    for metric in ranked_by:
        ranked = sorted((r for r in pool if _num(r.get(metric)) is not None),
                        key=lambda r: (-_num(r.get(metric)), r["number"]))  # type: ignore[operator]
        taken = 0
        for r in ranked:
            if taken >= top_k:
                break
            if r["key"] == default_key:
                taken += 1  # the default is measured anyway
                continue
            entry = chosen.setdefault(r["key"], {"key": r["key"], "knobs": {k: r[k] for k in _knob_names()},
                                                 "trials": [], "why": []})
            if r["number"] not in entry["trials"]:
                entry["trials"].append(r["number"])
            entry["why"].append(metric)
            taken += 1
    # Every trial that measured a chosen configuration (duplicates answered from it included).
    for r in records:
        if r.get("key") in chosen and r.get("state") == "COMPLETE" and r["number"] not in chosen[r["key"]]["trials"]:
            chosen[r["key"]]["trials"].append(r["number"])
    out = list(chosen.values())[:max_candidates]
    for c in out:
        c["trials"].sort()
    return out


def _knob_names() -> tuple[str, ...]:
    from xlstm_tune.runtime.options import KNOBS

    return KNOBS


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return None
    return float(v)


def signature(default_key: str, candidates: Sequence[Mapping[str, Any]], rounds: int, repeats: int,
              *, rule: Mapping[str, Any] | None = None) -> str:
    """Identifies a confirmation round; an unchanged signature means the stored round still holds.

    It names the decision rule too: a changed `confidence`, `max_trade` or `min_rounds` decides anew.
    """
    keys = ",".join(sorted(c["key"] for c in candidates))
    r = Rule.from_mapping(rule)
    return (f"default={default_key};candidates={keys};rounds={rounds};repeats={repeats};paired=1;"
            f"confidence={r.confidence};max_trade={r.max_trade};min_rounds={r.min_rounds}")


def summarize_round(raw: Mapping[str, Any], default: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]],
                    context_lens: Sequence[int], *, rule: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per configuration: summaries of the interleaved samples, fidelity, paired speed-ups over the default.

    Candidates get `paired` ({"prefill": {L: estimate}, "decode": estimate}, each estimate a
    `significance.Estimate` dict) and `speedup_prefill` / `speedup_decode` (the estimates' point values).
    """
    the_rule = Rule.from_mapping(rule)
    configs = [dict(default, role="default", trials=list(default.get("trials", [])))] + [
        dict(c, role="candidate") for c in candidates]
    results = raw.get("configs", {})
    out: list[dict[str, Any]] = []
    for cfg in configs:
        res = results.get(cfg["key"], {})
        entry: dict[str, Any] = {"key": cfg["key"], "role": cfg["role"], "knobs": dict(cfg["knobs"]),
                                 "trials": list(cfg.get("trials", [])), "why": list(cfg.get("why", [])),
                                 "fidelity": res.get("fidelity"), "error": res.get("error"),
                                 "prefill": {}, "decode": None}
        for n in context_lens:
            samples = res.get("prefill", {}).get(str(n)) or []
            entry["prefill"][str(n)] = summarize(samples).metric_dict() | {"samples": samples} if samples else None
        dec = res.get("decode") or []
        entry["decode"] = summarize(dec).metric_dict() | {"samples": dec} if dec else None
        out.append(entry)
    _paired(out, raw.get("pairs") or [], context_lens, the_rule)
    rounds = max((int(p.get("round", 0)) + 1 for p in raw.get("pairs") or []), default=0)
    return {"configs": out, "sequence": list(raw.get("sequence", [])), "duration_s": raw.get("duration_s"),
            "rule": the_rule.to_dict(), "paired_rounds": rounds}


def _paired(entries: list[dict[str, Any]], pairs: Sequence[Mapping[str, Any]], context_lens: Sequence[int],
            rule: Rule) -> None:
    """Paired estimates per candidate and phase; without pairs (replay), the ratio of medians, no evidence."""
    base = entries[0]
    base["paired"] = None
    base["speedup_prefill"] = {str(n): 1.0 if base["prefill"].get(str(n)) else None for n in context_lens}
    base["speedup_decode"] = 1.0 if base["decode"] else None
    for e in entries[1:]:
        mine = [p for p in pairs if p.get("key") == e["key"]]
        paired: dict[str, Any] = {"prefill": {}, "decode": None}
        for n in context_lens:
            est = estimate([(p["default"]["prefill"].get(str(n)), p["candidate"]["prefill"].get(str(n)))
                            for p in mine], rule)
            paired["prefill"][str(n)] = est.to_dict() if est else _unpaired(base["prefill"].get(str(n)),
                                                                             e["prefill"].get(str(n)))
        est = estimate([(p["default"].get("decode"), p["candidate"].get("decode")) for p in mine], rule)
        paired["decode"] = est.to_dict() if est else _unpaired(base["decode"], e["decode"])
        e["paired"] = paired
        e["speedup_prefill"] = {n: (v or {}).get("speedup") for n, v in paired["prefill"].items()}
        e["speedup_decode"] = (paired["decode"] or {}).get("speedup")


def _unpaired(base: Mapping[str, Any] | None, cand: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Figures without a pairing (a replayed record): a ratio of medians that is no evidence of anything."""
    if not (base and cand and base["median"] > 0):
        return None
    return {"speedup": cand["median"] / base["median"], "low": None, "high": None, "rounds": 0,
            "verdict": NO_EVIDENCE, "ratios": []}


def _passed(entry: Mapping[str, Any]) -> bool:
    fid = entry.get("fidelity") or {}
    return entry.get("error") is None and bool(fid.get("passed"))


def _phases(e: Mapping[str, Any], n: str) -> dict[str, dict[str, Any] | None]:
    paired = e.get("paired") or {}
    return {"prefill": (paired.get("prefill") or {}).get(n), "decode": paired.get("decode")}


def _chosen_for(mode: str) -> tuple[str, ...]:
    return {"prefill": ("prefill",), "decode": ("decode",)}.get(mode, ("prefill", "decode"))


def _score(e: Mapping[str, Any], n: str, mode: str) -> tuple[float, float] | None:
    """(objective score, tie-break) from the paired speed-ups; None if the objective was not measured."""
    sp, sd = e["speedup_prefill"].get(n), e["speedup_decode"]
    if mode == "decode":
        return (sd, sp or 0.0) if sd else None
    if mode == "prefill":
        return (sp, sd or 0.0) if sp else None
    return (math.sqrt(sp * sd), sp) if (sp and sd) else None


def choose_best(summary: Mapping[str, Any], context_lens: Sequence[int], mode: str) -> dict[str, dict[str, Any]]:
    """Context length -> the chosen entry (see the module docstring), with `winner` and `reason` added.

    The default is chosen (`winner` False) when no candidate wins; a length is left out only when the
    default itself has no usable measurement and nothing wins.
    """
    default = summary["configs"][0]
    cands = [e for e in summary["configs"][1:]]
    rule = Rule.from_mapping(summary.get("rule"))
    best: dict[str, dict[str, Any]] = {}
    for n in (str(x) for x in context_lens):
        passed = [e for e in cands if _passed(e)]
        winners = []
        for e in passed:
            verdicts = {p: (est or {}).get("verdict") for p, est in _phases(e, n).items()}
            score = _score(e, n, mode)
            if score is not None and is_winner(verdicts, _chosen_for(mode)):
                winners.append((score, e))
        if winners:
            winners.sort(key=lambda t: t[0], reverse=True)
            best[n] = dict(winners[0][1], winner=True, reason=None)
        elif _passed(default) and _score(default, n, mode) is not None:
            best[n] = dict(default, winner=False, reason=_no_winner_reason(cands, passed, n, mode, rule))
    return best


def _no_winner_reason(cands: Sequence[Mapping[str, Any]], passed: Sequence[Mapping[str, Any]], n: str, mode: str,
                      rule: Rule) -> str:
    if not cands:
        return "no candidate to confirm: no feasible trial other than the default"
    if not passed:
        return "no candidate passed the fidelity check in the confirmation round"
    scored = [(s, e) for e in passed if (s := _score(e, n, mode)) is not None]
    if not scored:
        return "no candidate measured the objective in the confirmation round"
    _, e = max(scored, key=lambda t: t[0])
    phases = _phases(e, n)
    rounds = max((est or {}).get("rounds", 0) for c in passed for est in _phases(c, n).values() if est)
    closest = f"closest: {_label(e)} " + ", ".join(
        f"{p} {fmt_interval(est)} {est['verdict']}" for p, est in phases.items() if est)
    if rounds < rule.min_rounds:
        return (f"not enough evidence: {rounds} paired round(s), at least {rule.min_rounds} needed "
                f"([confirm] rounds); {closest}")
    trade = f" beyond max_trade {rule.max_trade:g}" if rule.max_trade > 0 else ""
    return (f"no candidate is faster than the default with {rule.confidence:.0%} confidence without being "
            f"slower on the other phase{trade}; {closest}")


def _label(e: Mapping[str, Any]) -> str:
    return f"trial #{e['trials'][0]}" if e.get("trials") else e["key"]


def best_contexts(summary: Mapping[str, Any], chosen: Mapping[str, Mapping[str, Any]], records: Mapping[int, Mapping[str, Any]],
                  mode: str) -> list[dict[str, Any]]:
    """The `contexts` entries of best.json (tracking.best_export.build_best validates them).

    `winner` says whether the entry beat the default (False: the default kept, `reason` says why);
    `confirmation` holds the paired speed-ups with their intervals and verdicts (for a kept default:
    those of the closest candidate, so a reader sees what was tried).
    """
    default = summary["configs"][0]
    rule = Rule.from_mapping(summary.get("rule"))
    out = []
    for n_text, e in sorted(chosen.items(), key=lambda kv: int(kv[0])):
        trial = e["trials"][0] if e["trials"] else None
        rec = records.get(trial, {}) if trial is not None else {}
        pre, dec = e["prefill"].get(n_text), e["decode"]
        metrics: dict[str, Any] = {
            "prefill_tok_s": _strip(pre),
            "decode_tok_s": _strip(dec),
            "speedup_prefill": e["speedup_prefill"].get(n_text),
            "speedup_decode": e["speedup_decode"],
            "default_prefill_tok_s": _strip(default["prefill"].get(n_text)),
            "default_decode_tok_s": _strip(default["decode"]),
        }
        if rec:
            metrics["trial_prefill_tok_s"] = rec.get(f"prefill_tok_s_ctx{n_text}")
            metrics["trial_decode_tok_s"] = rec.get("decode_tok_s")
            metrics["compile_s"] = rec.get("compile_s")
        winner = bool(e.get("winner", e["role"] != "default"))
        shown = e if winner else _closest(summary, n_text, mode)
        confirmation: dict[str, Any] = {**rule.to_dict(), "paired_rounds": summary.get("paired_rounds", 0)}
        if shown is not None:
            confirmation.update({"of": "winner" if winner else "closest candidate", "key": shown["key"],
                                 "trial_number": shown["trials"][0] if shown.get("trials") else None,
                                 **{p: _brief(est) for p, est in _phases(shown, n_text).items()}})
        out.append({
            "context_len": int(n_text),
            "knobs": dict(e["knobs"]),
            "metrics": metrics,
            "fidelity": dict(e.get("fidelity") or {}),
            "trial_number": trial,
            "mlflow_run_id": rec.get("mlflow_run_id"),
            "is_default": e["role"] == "default",
            "winner": winner,
            "reason": e.get("reason"),
            "confirmation": confirmation,
            "selection": mode,
            "confirmed": True,
        })
    return out


def _closest(summary: Mapping[str, Any], n: str, mode: str) -> Mapping[str, Any] | None:
    scored = [(s, e) for e in summary["configs"][1:] if _passed(e) and (s := _score(e, n, mode)) is not None]
    return max(scored, key=lambda t: t[0])[1] if scored else None


def _brief(est: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not est:
        return None
    return {k: est[k] for k in ("speedup", "low", "high", "rounds", "verdict")}


def _strip(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    return {k: summary[k] for k in ("median", "p20", "p80", "cv", "n") if k in summary}


def replay_round(records_by_key: Mapping[str, Mapping[str, Any]], default: Mapping[str, Any],
                 candidates: Sequence[Mapping[str, Any]], context_lens: Sequence[int],
                 *, rule: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A confirmation 'round' from recorded figures (replay mode measures nothing, so it pairs nothing:
    every candidate lacks evidence and the default stays)."""
    raw: dict[str, Any] = {"configs": {}, "sequence": []}
    for cfg in [default, *candidates]:
        rec = records_by_key.get(cfg["key"])
        if rec is None:
            raw["configs"][cfg["key"]] = {"prefill": {}, "decode": [], "fidelity": None,
                                          "error": {"message": "not in the recorded measurements"}}
            continue
        fid = {k.removeprefix("fidelity_"): v for k, v in rec.items() if k.startswith("fidelity_")}
        raw["configs"][cfg["key"]] = {
            "prefill": {str(n): [rec[f"prefill_tok_s_ctx{n}"]] for n in context_lens
                        if _num(rec.get(f"prefill_tok_s_ctx{n}")) is not None},
            "decode": [rec["decode_tok_s"]] if _num(rec.get("decode_tok_s")) is not None else [],
            "fidelity": fid, "error": None,
        }
    return summarize_round(raw, default, candidates, context_lens, rule=rule)
