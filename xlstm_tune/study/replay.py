"""Replay: answer trials from recorded measurements instead of running the model.

`python -m xlstm_tune study --replay SOURCE` (SOURCE: a trials.jsonl, a study directory, or a study name
under `--out-dir`) runs the full study loop (sampler, constraints, files, MLflow, best.json) with every
trial answered from SOURCE's COMPLETE trials, keyed by their canonical knobs. It is deterministic for a
given sampler and seed, takes milliseconds per trial, and is how samplers are compared
(`benchmarks/sampler_efficiency.py`).

A sampled configuration that SOURCE never measured cannot be answered: the trial is recorded as pruned
with reason `not_recorded` and does not count toward `--n-trials` (record a full grid with
`--sampler grid` to replay any sampler without misses). The confirmation round reuses the recorded
figures (nothing is re-measured), so speed-ups are relative to the recorded default configuration.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.runtime.options import KNOBS
from xlstm_tune.study.records import measured
from xlstm_tune.study.space import knob_key


@dataclass
class ReplaySource:
    """Recorded trials and (if present beside them) the study's run_meta.json."""

    trials_path: Path
    records: list[dict[str, Any]]
    run_meta: dict[str, Any] | None = None
    lookup: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def study_name(self) -> str:
        if self.run_meta and self.run_meta.get("study_name"):
            return str(self.run_meta["study_name"])
        return self.trials_path.parent.name or "replay"


def resolve_source(source: str, out_dir: str | Path) -> Path:
    """SOURCE -> the trials.jsonl it names (a file, a study directory, or a study name under out_dir)."""
    p = Path(source)
    if p.is_file():
        return p
    if p.is_dir() and (p / "trials.jsonl").is_file():
        return p / "trials.jsonl"
    by_name = Path(out_dir) / "studies" / source / "trials.jsonl"
    if "/" not in source and by_name.is_file():
        return by_name
    raise UserError(f"--replay {source!r}: no trials.jsonl there: pass a trials.jsonl file, a study directory, "
                    f"or the name of a study under {Path(out_dir) / 'studies'}")


def load_source(source: str, out_dir: str | Path) -> ReplaySource:
    """Read SOURCE's records (and run_meta.json); UserError if it holds no complete trial."""
    from xlstm_tune.tracking.study_files import read_numbered_jsonl

    path = resolve_source(source, out_dir)
    records = read_numbered_jsonl(path)
    meta = None
    meta_path = path.parent / "run_meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = None
    good = [r for r in records if measured(r) and all(k in r for k in KNOBS)]
    if not good:
        raise UserError(f"--replay {source!r}: {path} holds no COMPLETE measured trial to replay")
    src = ReplaySource(trials_path=path, records=records, run_meta=meta)
    for r in good:
        key = r.get("key") or knob_key(r)
        src.lookup.setdefault(key, r)
    return src


def source_model_info(src: ReplaySource) -> dict[str, Any]:
    """Model facts for the replay's search space: from run_meta.json, else inferred from the records."""
    if src.run_meta and src.run_meta.get("model_info"):
        return dict(src.run_meta["model_info"])
    heads = max(int(r.get("heads_per_band") or 1) for r in src.lookup.values())
    return {"model_id": "unknown", "num_heads": heads, "slstm_num_heads": 0, "has_mlstm": True,
            "has_slstm": any(r.get("backend") == "native" and r.get("t_inner") not in (None, 1, 2, 4)
                             for r in src.lookup.values()),
            "config_hash": None}


def source_capabilities(src: ReplaySource) -> dict[str, Any]:
    if src.run_meta and src.run_meta.get("capabilities"):
        return dict(src.run_meta["capabilities"])
    modes = sorted({str(r.get("decode_mode")) for r in src.lookup.values()})
    return {"device": "replay", "device_type": "replay", "decode_modes": modes,
            "streams": any(int(r.get("streams") or 0) > 0 for r in src.lookup.values()), "compile": True}


def source_spec_doc(src: ReplaySource) -> dict[str, Any] | None:
    """The recorded study's spec as a document `spec.parse_spec` reads (None without run_meta.json)."""
    if not src.run_meta or not isinstance(src.run_meta.get("spec"), Mapping):
        return None
    doc = {k: v for k, v in src.run_meta["spec"].items() if k != "source"}
    return doc


class ReplayEvaluator:
    """Answers a trial from SOURCE's record of the same canonical configuration (None: not recorded)."""

    kind = "replay"

    def __init__(self, src: ReplaySource) -> None:
        self.src = src
        self.info = {"device": "replay", "device_summary": (src.run_meta or {}).get("device_summary") or {},
                     "model": (src.run_meta or {}).get("model_info") or {}}

    def start(self) -> dict[str, Any]:
        return self.info

    def evaluate(self, number: int, knobs: Mapping[str, Any], fault: str | None = None) -> dict[str, Any] | None:
        rec = self.src.lookup.get(knob_key(knobs))
        if rec is None:
            return None
        metrics = {k: v for k, v in rec.items()
                   if k.startswith(("prefill_", "decode_", "compile_s")) and not isinstance(v, (dict, list))}
        fidelity = {k.removeprefix("fidelity_"): v for k, v in rec.items() if k.startswith("fidelity_")}
        return {"state": "COMPLETE", "metrics": metrics, "fidelity": fidelity, "flags": rec.get("flags") or [],
                "replayed_from": rec["number"], "duration_s": 0.0}

    def records_by_key(self) -> dict[str, dict[str, Any]]:
        return self.src.lookup

    def close(self) -> None:
        pass


# ---- in-memory replay for sampler comparisons ------------------------------------------------------------
def replay_trace(lookup: Mapping[str, Mapping[str, Any]], space: Any, sampler_name: str, seed: int, n_trials: int,
                 objective: str, *, max_attempts: int | None = None) -> list[float | None]:
    """Run one in-memory replay study; return the objective value of each COMPLETE trial in order
    (None for an infeasible trial). Invalid or unrecorded samples are pruned and not counted."""
    return [v for v, _ in replay_trace_detailed(lookup, space, sampler_name, seed, n_trials, objective,
                                                max_attempts=max_attempts)]


def replay_trace_detailed(lookup: Mapping[str, Mapping[str, Any]], space: Any, sampler_name: str, seed: int,
                          n_trials: int, objective: str, *, max_attempts: int | None = None,
                          stop_at: float | None = None,
                          sampler_trials: int | None = None) -> list[tuple[float | None, bool]]:
    """Like `replay_trace`, with a flag per trial: True when it was the first trial of its configuration
    (a real study measures it; a repeat is answered from the first measurement).

    `stop_at` ends the run at the first feasible value >= it; `sampler_trials` is the study size the
    sampler is configured for (its random start-up phase scales with it; default `n_trials`)."""
    import optuna

    from xlstm_tune.study.samplers import make_sampler, set_constraint

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grid = space.grid() if sampler_name == "grid" else None
    sampler = make_sampler(sampler_name, seed=seed, n_objectives=1, n_trials=sampler_trials or n_trials, grid=grid)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    out: list[tuple[float | None, bool]] = []
    seen: set[str] = set()
    attempts = 0
    max_attempts = max_attempts or 20 * n_trials
    while len(out) < n_trials and attempts < max_attempts:
        attempts += 1
        trial = study.ask()
        params = space.suggest(trial)
        raw = space.knobs_from_params(params)
        if space.check(raw) is not None:
            _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            continue
        key = knob_key(space.canonical(raw))
        rec = lookup.get(key)
        if rec is None or rec.get(objective) is None:
            _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            continue
        value = float(rec[objective])
        feasible = bool(rec.get("fidelity_passed", rec.get("feasible", True)))
        set_constraint(trial, -1.0 if feasible else 1.0)
        stopped = _tell(study, trial, values=[value])
        out.append((value if feasible else None, key not in seen))
        seen.add(key)
        if stopped or (stop_at is not None and feasible and value >= stop_at):
            break
    return out


def _tell(study: Any, trial: Any, **kwargs: Any) -> bool:
    """study.tell that tolerates GridSampler's study.stop() outside optimize(); True when the grid is done."""
    try:
        study.tell(trial, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" in str(exc):
            return True
        raise
    return False


def exhaustive_optimum(lookup: Mapping[str, Mapping[str, Any]], space: Any, objective: str) -> tuple[float, str]:
    """The best feasible recorded value over every valid configuration of `space` (and its key)."""
    best, best_key = float("-inf"), ""
    for knobs in space.iter_configs():
        rec = lookup.get(knob_key(knobs))
        if rec is None or rec.get(objective) is None:
            continue
        if not bool(rec.get("fidelity_passed", rec.get("feasible", True))):
            continue
        if float(rec[objective]) > best:
            best, best_key = float(rec[objective]), knob_key(knobs)
    if best_key == "":
        raise UserError("the recorded grid has no feasible measured configuration inside this space")
    return best, best_key


def trials_to_reach(values: Sequence[float | None], target: float) -> int | None:
    """1-based index of the first trial reaching `target` (None: never)."""
    for i, v in enumerate(values, start=1):
        if v is not None and v >= target:
            return i
    return None
