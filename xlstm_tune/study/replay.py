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

Early stopping is replayed too: each recorded trial is walked through its measurement stages
(study.pruning: screen, prefill per context, decode) with the figures and the cost in seconds each stage
had when it was recorded (`stage_figures`, `stage_s`; records made before stages were recorded get
estimates from their per-call times, `stage_plan`), the study's rule is applied after each stage, and
the trial's `duration_s` is what the stages it ran cost. A configuration the recording itself pruned is
known only up to its stage: replay prunes it there or, when the replayed study would have gone on, charges
an estimate of the remaining stages and records it pruned (it was hopeless against the recorded front).

`replay_costed` is the same study in memory, for sampler comparisons: it measures first what `study`
measures first (`study_queue`: the default, [study] enqueue, the shipped configuration) and charges each
trial the recorded seconds of the stages it ran (`ReplayEvent.stage_s`, estimates listed in `estimated`).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.runtime.options import KNOBS
from xlstm_tune.study import pruning
from xlstm_tune.study.records import measured
from xlstm_tune.study.space import knob_key


@dataclass
class ReplaySource:
    """Recorded trials and (if present beside them) the study's run_meta.json."""

    trials_path: Path
    records: list[dict[str, Any]]
    run_meta: dict[str, Any] | None = None
    lookup: dict[str, dict[str, Any]] = field(default_factory=dict)
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)  # configurations the recording pruned
    decode_cost_s: float | None = None  # median recorded decode stage cost (estimates for partial records)

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
    for r in records:
        if r.get("state") == "PRUNED" and r.get("stage_figures") and all(k in r for k in KNOBS):
            key = r.get("key") or knob_key(r)
            if key not in src.lookup:
                src.partial.setdefault(key, r)
    return src


def _pos(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    return v if v > 0 and v == v and v != float("inf") else 0.0


def stage_plan(rec: Mapping[str, Any], bench: Mapping[str, Any], context_lens: Sequence[int],
               fallback_decode_s: float = 0.0) -> list[tuple[str, dict[str, float], float]]:
    """(stage, figures it measured, seconds it cost) in measurement order, for one recorded trial.

    Recorded stages (`stage_figures`/`stage_s`) are used as they are. Otherwise the plan is estimated
    from the record's per-call times: the screen is the first call plus one call at the shortest
    context; a full stage is (1 + warmup + repeats) calls; decode also prefills its prompt once. A
    configuration recorded only to a stage gets the rest estimated from its screen throughput (and
    `fallback_decode_s` for decode).
    """
    lens = sorted(int(n) for n in context_lens)
    calls = 1 + int(bench.get("warmup", 1)) + int(bench.get("repeats", 5))
    figs_rec = rec.get("stage_figures") or {}
    cost_rec = rec.get("stage_s") or {}
    names = pruning.stages(lens)
    plan: list[tuple[str, dict[str, float], float]] = []
    screen = figs_rec.get(pruning.STAGE_SCREEN) or {}
    screen_rate = _pos(screen.get(f"prefill_tok_s_ctx{lens[0]}")) or _pos(rec.get(f"prefill_tok_s_ctx{lens[0]}"))
    for name in names:
        if name in figs_rec:
            plan.append((name, dict(figs_rec[name]), _pos(cost_rec.get(name))))
            continue
        if name == pruning.STAGE_SCREEN:
            fig = pruning.stage_figures({k: v for k, v in rec.items() if k.startswith(f"prefill_tok_s_ctx{lens[0]}")})
            cost = _pos(rec.get(f"prefill_first_call_s_ctx{lens[0]}")) + _pos(rec.get(f"prefill_s_ctx{lens[0]}"))
            plan.append((name, fig, cost))
        elif name == pruning.STAGE_DECODE:
            fig = pruning.stage_figures({k: v for k, v in rec.items() if k.startswith("decode_tok_s")})
            per = _pos(rec.get("decode_s"))
            cost = (_pos(rec.get("decode_first_call_s")) + calls * per) if per else fallback_decode_s
            plan.append((name, fig, cost))
        else:
            n = int(name.removeprefix("prefill_ctx"))
            fig = pruning.stage_figures({k: v for k, v in rec.items() if k.startswith(f"prefill_tok_s_ctx{n}")})
            per = _pos(rec.get(f"prefill_s_ctx{n}")) or (n / screen_rate if screen_rate else 0.0)
            plan.append((name, fig, calls * per))
    return plan


def replay_outcome(rec: Mapping[str, Any], plan: Sequence[tuple[str, Mapping[str, float], float]],
                   limits: Mapping[str, Any] | None, time_limit_s: float | None, *,
                   recorded_to: str | None = None, fidelity_s: float = 0.0) -> dict[str, Any]:
    """Walk `plan` with the pruning rule as the worker would: a PRUNED or COMPLETE outcome with its cost.

    `recorded_to`: the stage the recording stopped at (its later figures are estimates, not measured).
    """
    figures: dict[str, float] = {}
    stage_s: dict[str, float] = {}
    stage_figs: dict[str, dict[str, float]] = {}
    elapsed = 0.0
    for name, figs, cost in plan:
        elapsed += cost
        stage_s[name] = cost
        if recorded_to is None or name in (rec.get("stage_figures") or {}):
            figures.update(figs)
            stage_figs[name] = dict(figs)
        if name == pruning.STAGE_DECODE:
            break
        why, reason = pruning.verdict(limits, figures, name), pruning.PRUNED_REASON
        if why is None:
            why, reason = pruning.slow_reason(elapsed, time_limit_s), pruning.SLOW_REASON
        if why is None and recorded_to is not None and name == recorded_to:
            continue  # the replayed study would go on: the rest is charged below as an estimate
        if why is not None:
            return {"state": "PRUNED", "metrics": dict(figures), "pruned_stage": name, "prune_reason": why,
                    "failure_reason": reason, "stage_s": stage_s, "stage_figures": stage_figs,
                    "duration_s": elapsed, "replayed_from": rec.get("number")}
    if recorded_to is not None:
        return {"state": "PRUNED", "metrics": dict(figures), "pruned_stage": recorded_to,
                "prune_reason": f"pruned when recorded (after stage {recorded_to}); the remaining stages' cost is "
                                f"estimated", "failure_reason": pruning.PRUNED_REASON, "stage_s": stage_s,
                "stage_figures": stage_figs, "duration_s": elapsed, "replayed_from": rec.get("number")}
    stage_s["fidelity"] = fidelity_s
    return {"state": "COMPLETE", "stage_s": stage_s, "stage_figures": stage_figs, "duration_s": elapsed + fidelity_s}


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


def _spec_section(src: ReplaySource, name: str) -> dict[str, Any]:
    return dict(((src.run_meta or {}).get("spec") or {}).get(name) or {})


def recorded_outcome(src: ReplaySource, rec: Mapping[str, Any], limits: Mapping[str, Any] | None,
                     time_limit_s: float | None) -> dict[str, Any]:
    """A recorded trial (complete or pruned when recorded) as the outcome a study with `limits` gets."""
    import statistics

    lens = _spec_section(src, "workload").get("context_lens") or rec.get("context_lens") or []
    bench = _spec_section(src, "bench")
    if src.decode_cost_s is None:
        costs = [c for r in src.lookup.values() for n, _, c in stage_plan(r, bench, lens) if n == pruning.STAGE_DECODE]
        src.decode_cost_s = statistics.median(costs) if costs else 0.0
    partial = rec.get("state") != "COMPLETE"
    plan = stage_plan(rec, bench, lens, src.decode_cost_s)
    fid = _pos((rec.get("stage_s") or {}).get("fidelity")) or _pos((rec.get("phases") or {}).get("fidelity_s"))
    out = replay_outcome(rec, plan, limits, time_limit_s, recorded_to=rec.get("pruned_stage") if partial else None,
                         fidelity_s=fid)
    out["replayed_from"] = rec.get("number")
    if out["state"] == "COMPLETE":
        out["metrics"] = {k: v for k, v in rec.items()
                          if k.startswith(("prefill_", "decode_", "compile_s")) and not isinstance(v, (dict, list))}
        out["fidelity"] = {k.removeprefix("fidelity_"): v for k, v in rec.items() if k.startswith("fidelity_")}
        out["flags"] = rec.get("flags") or []
    return out


class ReplayEvaluator:
    """Answers a trial from SOURCE's record of the same canonical configuration (None: not recorded)."""

    kind = "replay"

    def __init__(self, src: ReplaySource) -> None:
        self.src = src
        self.listener: Any = None  # nothing runs, so no phases to hear
        self.info = {"device": "replay", "device_summary": (src.run_meta or {}).get("device_summary") or {},
                     "model": (src.run_meta or {}).get("model_info") or {}}

    def start(self) -> dict[str, Any]:
        return self.info

    def evaluate(self, number: int, knobs: Mapping[str, Any], fault: str | None = None, *,
                 prune: Mapping[str, Any] | None = None, time_limit_s: float | None = None,
                 hard_timeout_s: float | None = None) -> dict[str, Any] | None:
        """The recorded trial, walked through its stages with the pruning rule; None: never recorded."""
        key = knob_key(knobs)
        rec = self.src.lookup.get(key) or self.src.partial.get(key)
        if rec is None:
            return None
        return recorded_outcome(self.src, rec, prune, time_limit_s)

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
        trial, params, knobs = _ask(study, space)
        if knobs is None:
            continue
        key = knob_key(knobs)
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


def _ask(study: Any, space: Any) -> tuple[Any, dict[str, Any], dict[str, Any] | None]:
    """(trial, sampled params, canonical knobs); knobs None for an invalid combination (already told PRUNED)."""
    import optuna

    trial = study.ask()
    params = space.suggest(trial)
    raw = space.knobs_from_params(params)
    if space.check(raw) is not None:
        _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        return trial, params, None
    return trial, params, space.canonical(raw)


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


# ---- costed replay: what a study spends, in recorded seconds, with or without early stopping -------------
@dataclass
class ReplayEvent:
    """One trial of a costed replay: its recorded cost, state, objective values and configuration."""

    cost_s: float
    state: str
    values: list[float] | None
    feasible: bool
    key: str
    stage_s: dict[str, float] = field(default_factory=dict)  # what cost_s is made of, per stage (+ fidelity)
    estimated: tuple[str, ...] = ()  # stages of stage_s the recording never ran (estimated by stage_plan)


def study_queue(src: ReplaySource, space: Any, objectives: Sequence[str]) -> list[dict[str, Any]]:
    """Sampler params a fresh study over SOURCE's spec measures first, in order, as `study` queues them
    (study.runner): the default (when the space holds it), the spec's [study] enqueue entries, then the
    shipped configuration for the recorded device type (`[study] shipped_config`, study.warm_start)."""
    from xlstm_tune.study.plan import enqueue_params, first_trials
    from xlstm_tune.study.warm_start import plan_seeds

    study = _spec_section(src, "study")
    enqueued = [enqueue_params(space, n, e) for n, e in enumerate(study.get("enqueue") or [], 1)]
    device_type = str(source_capabilities(src).get("device_type") or "")
    seeds = []
    if study.get("shipped_config", True) and device_type in ("cpu", "cuda", "mps"):
        seeds = plan_seeds([], src.trials_path.parent, objectives, space, device_type)[0]
    return [params for params, _ in first_trials(space, enqueued, seeds)]


def replay_costed(src: ReplaySource, space: Any, sampler_name: str, seed: int, objectives: Sequence[str],
                  rule: Any, *, max_trials: int, sampler_trials: int, stop: Any = None,
                  enqueue: Sequence[Mapping[str, Any]] | None = None) -> list[ReplayEvent]:
    """An in-memory study over SOURCE, as `study --replay` runs it: `enqueue` first, duplicates answered
    from their first measurement (cost 0), every other trial walked through its recorded stages with
    `rule` (study.pruning.PruneRule; `enabled = False`: measured to the end) and charged what those
    stages cost. `stop(events)` ends the run early (e.g. once a target is reached). `enqueue`: the
    params measured first (default `study_queue`: what `study` itself measures first, e.g. the shipped
    configuration, which gives early stopping its first front).

    A trial's cost is the sum of its stages' recorded seconds (`stage_s`: the screen includes the first
    call, i.e. any compile the recording paid there; a COMPLETE trial adds its fidelity check), up to the
    stage the rule stops it at. Stages the recording never ran (a configuration it pruned, which this
    study measures further; records without `stage_s`) are estimated (`stage_plan`) and listed in the
    event's `estimated`. Not charged: the worker's start, model load and reference (once per study, the
    same for every sampler), the confirmation round, and the study's own overhead."""
    import optuna

    from xlstm_tune.study.records import build_record
    from xlstm_tune.study.samplers import make_sampler, set_constraint

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    sampler = make_sampler(sampler_name, seed=seed, n_objectives=len(objectives), n_trials=sampler_trials,
                           grid=space.grid() if sampler_name == "grid" else None)
    study = optuna.create_study(directions=["maximize"] * len(objectives), sampler=sampler)
    if sampler_name != "grid":
        for params in (study_queue(src, space, objectives) if enqueue is None else enqueue):
            study.enqueue_trial(dict(params))
    records: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    events: list[ReplayEvent] = []
    attempts = 0
    while len(events) < max_trials and attempts < 20 * max_trials:
        attempts += 1
        trial, params, knobs = _ask(study, space)
        if knobs is None:
            continue
        key = knob_key(knobs)
        estimated: tuple[str, ...] = ()
        if key in seen:  # answered from the first measurement: free
            prev = seen[key]
            outcome = {"state": prev["state"], "duration_s": 0.0, "stage_s": {}}
            rec = prev
        else:
            base = src.lookup.get(key) or src.partial.get(key)
            if base is None:
                _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                continue
            limits = pruning.thresholds(records, objectives, rule)
            outcome = recorded_outcome(src, base, limits, pruning.time_limit_s(records, rule))
            recorded_stages = base.get("stage_s") or {}
            estimated = tuple(n for n in outcome.get("stage_s") or {} if n not in recorded_stages)
            rec = build_record(len(records), state=outcome["state"], params=params, knobs=knobs, compile=False,
                               key=key, outcome=outcome, objectives=objectives,
                               failure_reason=outcome.get("failure_reason"))
            records.append(rec)
            seen[key] = rec
        cost = float(outcome.get("duration_s") or 0.0)
        if rec["state"] == "COMPLETE":
            values = [float(v) for v in rec["objective_values"]]
            set_constraint(trial, rec.get("constraint", 1.0))
            stopped = _tell(study, trial, values=values)
            events.append(ReplayEvent(cost, "COMPLETE", values, bool(rec.get("feasible")), key,
                                      dict(outcome.get("stage_s") or {}), estimated))
        else:
            stopped = _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            events.append(ReplayEvent(cost, "PRUNED", None, False, key, dict(outcome.get("stage_s") or {}),
                                      estimated))
        if stopped or (stop is not None and stop(events)):
            break
    return events
