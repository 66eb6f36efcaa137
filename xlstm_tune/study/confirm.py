"""The confirmation round: nothing is declared best on the strength of one trial's figure.

The top `top_k` feasible trials per criterion (prefill tok/s at each context length; decode tok/s) are
re-measured in one worker, interleaved with the default configuration (D, C1, D, C2, ..., the candidate
order rotating each round), so slow drift of the machine (heat, background load) hits both sides alike.
Speed-up = candidate median / default median from the same round. The fidelity check is repeated too.

Choosing the best per context length, among confirmed candidates that passed fidelity and the default:

    only prefill objectives   highest confirmed prefill tok/s at that length
    only decode_tok_s         highest confirmed decode tok/s (the same knobs for every length)
    both (Pareto study)       highest geometric mean of the two speed-ups over the default, so neither
                              phase is traded away for the other; ties go to the faster prefill

A best that does not beat the default is the default itself (speed-up 1.0).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from xlstm_tune.bench.stats import summarize
from xlstm_tune.study.records import is_feasible, measured


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


def signature(default_key: str, candidates: Sequence[Mapping[str, Any]], rounds: int, repeats: int) -> str:
    """Identifies a confirmation round; an unchanged signature means the stored round still holds."""
    keys = ",".join(sorted(c["key"] for c in candidates))
    return f"default={default_key};candidates={keys};rounds={rounds};repeats={repeats}"


def summarize_round(raw: Mapping[str, Any], default: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]],
                    context_lens: Sequence[int]) -> dict[str, Any]:
    """Per configuration: summaries of the interleaved samples, fidelity, speed-ups over the default."""
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
    _speedups(out, context_lens)
    return {"configs": out, "sequence": list(raw.get("sequence", [])), "duration_s": raw.get("duration_s")}


def _speedups(entries: list[dict[str, Any]], context_lens: Sequence[int]) -> None:
    base = entries[0]
    for e in entries:
        e["speedup_prefill"] = {}
        for n in context_lens:
            b, c = base["prefill"].get(str(n)), e["prefill"].get(str(n))
            e["speedup_prefill"][str(n)] = (c["median"] / b["median"]) if (b and c and b["median"] > 0) else None
        b, c = base["decode"], e["decode"]
        e["speedup_decode"] = (c["median"] / b["median"]) if (b and c and b["median"] > 0) else None


def _passed(entry: Mapping[str, Any]) -> bool:
    fid = entry.get("fidelity") or {}
    return entry.get("error") is None and bool(fid.get("passed"))


def choose_best(summary: Mapping[str, Any], context_lens: Sequence[int], mode: str) -> dict[str, dict[str, Any]]:
    """Context length -> the chosen entry (see the module docstring). Empty if nothing passed fidelity."""
    entries = [e for e in summary["configs"] if _passed(e)]
    best: dict[str, dict[str, Any]] = {}
    for n in context_lens:
        scored = []
        for e in entries:
            pre = e["prefill"].get(str(n))
            dec = e["decode"]
            if mode == "decode":
                score = dec["median"] if dec else None
                tie = pre["median"] if pre else 0.0
            elif mode == "prefill":
                score = pre["median"] if pre else None
                tie = dec["median"] if dec else 0.0
            else:
                sp, sd = e["speedup_prefill"].get(str(n)), e["speedup_decode"]
                score = math.sqrt(sp * sd) if (sp and sd) else None
                tie = pre["median"] if pre else 0.0
            if score is not None:
                scored.append((score, tie, e["role"] == "default", e))
        if not scored:
            continue
        scored.sort(key=lambda t: (t[0], t[1], t[2]), reverse=True)
        best[str(n)] = scored[0][3]
    return best


def best_contexts(summary: Mapping[str, Any], chosen: Mapping[str, Mapping[str, Any]], records: Mapping[int, Mapping[str, Any]],
                  mode: str) -> list[dict[str, Any]]:
    """The `contexts` entries of best.json (tracking.best_export.build_best validates them)."""
    default = summary["configs"][0]
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
        out.append({
            "context_len": int(n_text),
            "knobs": dict(e["knobs"]),
            "metrics": metrics,
            "fidelity": dict(e.get("fidelity") or {}),
            "trial_number": trial,
            "mlflow_run_id": rec.get("mlflow_run_id"),
            "is_default": e["role"] == "default",
            "selection": mode,
            "confirmed": True,
        })
    return out


def _strip(summary: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not summary:
        return None
    return {k: summary[k] for k in ("median", "p20", "p80", "cv", "n") if k in summary}


def replay_round(records_by_key: Mapping[str, Mapping[str, Any]], default: Mapping[str, Any],
                 candidates: Sequence[Mapping[str, Any]], context_lens: Sequence[int]) -> dict[str, Any]:
    """A confirmation 'round' from recorded figures (replay mode measures nothing)."""
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
    return summarize_round(raw, default, candidates, context_lens)
