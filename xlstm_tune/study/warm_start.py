"""Warm starts: seed a new study with configurations that were good elsewhere.

    python -m xlstm_tune study --experiment experiments/xlstm_7b_gpu.toml --warm-start xlstm-350m

Each `--warm-start SOURCE` (repeatable) is an earlier study's name under `--out-dir`, a study directory,
a trials.jsonl, or a best.json. From a study, its Pareto front (feasible measured trials that no other
dominates on this study's objectives, study.pruning.front) is taken; from a best.json, the knobs of each
context entry. The shipped configuration for the device (`configs/<cpu|cuda|mps>.toml`,
`runtime.config_file.shipped_config`) is added too, also without any --warm-start (`[study] shipped_config
= false` turns that off). Every seed is checked against this study's space (a configuration the
space cannot express is skipped, with a note) and de-duplicated by canonical configuration; the study
enqueues them after the default (`Study.enqueue_trial`, user attr `origin`), so the sampler learns from
them as its first trials, and the report lists where each came from.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.runtime.options import KNOBS
from xlstm_tune.study.pruning import front
from xlstm_tune.study.space import knob_key


@dataclass(frozen=True)
class Seed:
    """One configuration to measure early, and where it came from."""

    knobs: dict[str, Any]
    origin: str


def resolve(source: str, out_dir: str | Path) -> Path:
    """SOURCE -> a trials.jsonl or best.json file; UserError naming what to pass otherwise."""
    p = Path(source)
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("trials.jsonl", "best.json"):
            if (p / name).is_file():
                return p / name
    by_name = Path(out_dir) / "studies" / source
    if "/" not in source and (by_name / "trials.jsonl").is_file():
        return by_name / "trials.jsonl"
    raise UserError(f"--warm-start {source!r}: no study there: pass a study name under {Path(out_dir) / 'studies'}, "
                    f"a study directory, a trials.jsonl or a best.json")


def _knobs(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: values[k] for k in KNOBS if values.get(k) is not None}


def seeds_from_file(path: Path, objectives: Sequence[str]) -> list[Seed]:
    """The front of a trials.jsonl, or the context entries of a best.json."""
    if path.suffix == ".json":
        from xlstm_tune.runtime.best_file import read_best

        best = read_best(path)
        study = (best.get("provenance") or {}).get("study_name") or path.parent.name
        return [Seed(_knobs(c["knobs"]), f"warm start: {study} best.json (context {c['context_len']})")
                for c in best["contexts"]]
    from xlstm_tune.tracking.study_files import read_numbered_jsonl

    try:
        records = read_numbered_jsonl(path)
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"--warm-start {path}: cannot read it ({exc}); pass a trials.jsonl a study wrote") from None
    study = path.parent.name
    meta = path.parent / "run_meta.json"
    if meta.is_file():
        try:
            study = json.loads(meta.read_text(encoding="utf-8")).get("study_name") or study
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    pts = front(records, objectives)
    if not pts:  # the earlier study optimised other figures: fall back to its own headline objectives
        pts = front(records, ["prefill_tok_s", "decode_tok_s"])
    by_number = {r.get("number"): r for r in records}
    return [Seed(_knobs(by_number[p["number"]]), f"warm start: {study} front (trial #{p['number']})")
            for p in pts if p.get("number") in by_number]


def shipped_seed(device_type: str) -> tuple[Seed | None, str | None]:
    """The shipped `configs/<device_type>.toml` knobs as a seed (runtime.config_file), or (None, why not)."""
    from xlstm_tune.runtime.config_file import load_config, shipped_config

    try:
        config = load_config(shipped_config(device_type))
    except UserError as exc:
        return None, f"no shipped config used: {exc}"
    if not config.knobs:
        return None, f"the shipped config for {device_type} sets no knobs"
    return Seed(dict(config.knobs), f"shipped configs/{Path(config.path).name}"), None


def plan_seeds(sources: Sequence[str], out_dir: str | Path, objectives: Sequence[str], space: Any,
               device_type: str, *, shipped: bool = True) -> tuple[list[tuple[dict[str, Any], Seed]], list[str]]:
    """(sampler params, seed) for every usable seed, in order, plus notes on the ones skipped.

    Raises UserError for a SOURCE that does not exist (before anything is opened)."""
    raw: list[Seed] = []
    for source in sources:
        raw += seeds_from_file(resolve(source, out_dir), objectives)
    notes: list[str] = []
    if shipped:
        seed, why = shipped_seed(device_type)
        if seed is not None:
            raw.append(seed)
        elif why:
            notes.append(why)
    default_key = knob_key(space.canonical(space.default_knobs()))
    seen = {default_key}
    out: list[tuple[dict[str, Any], Seed]] = []
    for seed in raw:
        knobs = dict(space.default_knobs(), **seed.knobs)
        why = space.check(knobs)
        params = None if why else space.params_for(knobs)
        if params is None:
            notes.append(f"{seed.origin}: {seed.knobs} skipped ({why or 'not in this study space'})")
            continue
        key = knob_key(space.canonical(knobs))
        if key in seen:
            continue
        seen.add(key)
        out.append((params, seed))
    return out, notes
