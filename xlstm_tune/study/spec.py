"""Experiment specs (`experiments/*.toml`): what a study measures, searches and optimises.

A spec is read strictly: an unknown section, key or knob, an empty range or a bad value is a UserError
naming the file, the field and the fix, raised before anything is created or opened. Layers, lowest first:

    built-in defaults < the TOML file < [device.<type>] overrides (once the device is known) < CLI flags

Sections (every key optional except where noted; see docs/STUDY.md and experiments/quickstart.toml):

    [study]     name, n_trials, sampler, seed, timeout_s, objectives
    [model]     name, device, dtype, compile, seed
    [workload]  context_lens, new_tokens, decode_context_len, batch_size, prompt, prompt_file, prompt_seed
    [bench]     warmup, repeats, max_cv, max_rounds, busy_retries, max_other_cpu
    [runtime]   threads, interop_threads, tf32_cell, fused_decode, triton_gemv, decode_pdl, prefill_graph,
                prefill_segment
                (process-wide settings)
    [fidelity]  rel_tol, min_greedy_agreement, prompt_len, decode_steps
    [trial]     timeout_s, worker_start_timeout_s
    [confirm]   top_k, rounds, repeats, max_candidates, confidence, max_trade, min_rounds
    [sampler]   n_startup_trials, population_size (sampler-specific tuning)
    [pruning]   enabled, margin, noise_k, min_trials, slow_factor, slow_min_s, screen_margin (early stopping,
                study.pruning)
    [space]     knob = [choices] or knob = {low, high, step, log}
    [fixed]     knob = value   (knobs not searched; default: the runtime's built-in defaults)
    [device.cpu|cuda|mps]  any of the sections above, merged in when the study runs on that device type
"""
from __future__ import annotations

import copy
import importlib.resources
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.runtime.options import DECODE_MODES, KNOBS, check_knob_bounds, normalize_backend
from xlstm_tune.runtime.settings import DTYPE_NAMES, settings_from_mapping

SAMPLERS = ("tpe", "ga", "random", "grid", "gp", "cmaes")
SAMPLER_ALIASES = {"nsga2": "ga", "nsgaii": "ga", "nsga-ii": "ga", "bruteforce": "grid"}
OBJECTIVE_BASES = ("prefill_tok_s", "decode_tok_s")
_CTX_OBJECTIVE = re.compile(r"^prefill_tok_s_ctx(\d+)$")
DEVICE_TYPES = ("cpu", "cuda", "mps")
# Fidelity tolerance by weight dtype (rel_err of the logits): float32 per docs/DESIGN.md §3; the half
# types round every activation, so their bound is set by bf16/fp16 epsilon times the model depth.
DEFAULT_REL_TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}

_SECTIONS: dict[str, dict[str, Any]] = {
    "study": {"name": "xlstm-study", "n_trials": 20, "sampler": "tpe", "seed": 0, "timeout_s": None,
              "objectives": ["prefill_tok_s", "decode_tok_s"],
              # configurations to measure first (after the default), e.g. a known-good one on this device:
              # the sampler learns from them instead of spending its start-up trials on random draws
              "enqueue": [],
              # the shipped configs/<device type>.toml knobs are measured early too (study.warm_start)
              "shipped_config": True},
    "model": {"name": "tiny", "device": "auto", "dtype": "float32", "compile": True, "seed": 0},
    "workload": {"context_lens": [512, 2048], "new_tokens": 32, "decode_context_len": None, "prompt": None,
                 "prompt_file": None, "prompt_seed": 0,
                 "batch_size": 1},  # sequences decoded together (decode_tok_s counts batch_size x tokens)
    # busy_retries: re-measurements of a figure taken while other processes used more than max_other_cpu
    # of this process's CPUs (bench/load.py); still busy after them, the figure is flagged busy_machine
    "bench": {"warmup": 1, "repeats": 5, "max_cv": 0.10, "max_rounds": 3, "busy_retries": 1, "max_other_cpu": 0.25},
    # process-wide settings of every trial (runtime/settings.py); threads None: the device's default
    "runtime": {"threads": None, "interop_threads": None, "tf32_cell": True, "fused_decode": True,
                "triton_gemv": True, "decode_pdl": True, "prefill_graph": False, "prefill_segment": 0},
    "fidelity": {"rel_tol": None, "min_greedy_agreement": None, "prompt_len": 256, "decode_steps": 8},
    "trial": {"timeout_s": 600.0, "worker_start_timeout_s": 600.0},
    # A winner must beat the default with `confidence` (bootstrap interval of the paired per-round ratios)
    # and lose at most `max_trade` (a fraction) of the other phase; see study/significance.py.
    "confirm": {"top_k": 2, "rounds": 3, "repeats": 1, "max_candidates": 6, "confidence": 0.95,
                "max_trade": 0.0, "min_rounds": 3},
    "sampler": {"n_startup_trials": None, "population_size": None},
    # Early stopping (study.pruning): a trial far behind the Pareto front after a stage stops there, and
    # a trial past slow_factor x the median trial time is cut. `enabled = false` measures every trial fully.
    "pruning": {"enabled": True, "margin": 2.0, "noise_k": 3.0, "min_trials": 1, "slow_factor": 4.0,
                "slow_min_s": 30.0, "screen_margin": 4.0},
    # Every trial's continuation is scored (text metrics, perplexity under the canonical path) and judged:
    # `builtin` is an offline heuristic; `ollama` / `openai` call an LLM judge at judge_url; `none` skips it.
    "quality": {"judge": "builtin", "judge_url": None, "judge_model": None, "perplexity": True},
}


def packaged_quickstart() -> Path:
    """The quickstart spec shipped inside the package (identical to experiments/quickstart.toml)."""
    return Path(str(importlib.resources.files("xlstm_tune") / "experiments" / "quickstart.toml"))


@dataclass(frozen=True)
class Dimension:
    """One searched knob: categorical `choices`, or an int range `low..high` (`step`, or `log` spacing)."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: int | None = None
    high: int | None = None
    step: int = 1
    log: bool = False

    @property
    def is_range(self) -> bool:
        return self.choices is None

    def values(self) -> list[Any]:
        """Every value the dimension can take (ranges enumerated by `step`)."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        return list(range(self.low, self.high + 1, self.step))

    def with_values(self, values: list[Any]) -> "Dimension":
        """A categorical dimension over `values` (used when a range/choices list is narrowed)."""
        return Dimension(self.name, tuple(values))

    def as_spec(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.step != 1:
            out["step"] = self.step
        if self.log:
            out["log"] = True
        return out


@dataclass
class ExperimentSpec:
    """A parsed, validated spec. `raw` is the merged document (defaults filled), kept for run_meta.json."""

    source: str
    study: dict[str, Any]
    model: dict[str, Any]
    workload: dict[str, Any]
    bench: dict[str, Any]
    runtime: dict[str, Any]
    fidelity: dict[str, Any]
    trial: dict[str, Any]
    confirm: dict[str, Any]
    sampler: dict[str, Any]
    quality: dict[str, Any]
    space: dict[str, Dimension]
    fixed: dict[str, Any]
    pruning: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(_SECTIONS["pruning"]))
    device_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    # ---- convenience ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.study["name"]

    @property
    def objectives(self) -> list[str]:
        return list(self.study["objectives"])

    @property
    def context_lens(self) -> list[int]:
        return list(self.workload["context_lens"])

    def rel_tol(self) -> float:
        tol = self.fidelity["rel_tol"]
        return float(tol) if tol is not None else DEFAULT_REL_TOL[self.model["dtype"]]

    def to_dict(self) -> dict[str, Any]:
        """The whole spec as plain data (run_meta.json, MLflow params, the spec-compatibility check)."""
        return {
            "source": self.source,
            "study": copy.deepcopy(self.study),
            "model": copy.deepcopy(self.model),
            "workload": copy.deepcopy(self.workload),
            "bench": copy.deepcopy(self.bench),
            "runtime": copy.deepcopy(self.runtime),
            "fidelity": {**copy.deepcopy(self.fidelity), "rel_tol": self.rel_tol()},
            "trial": copy.deepcopy(self.trial),
            "confirm": copy.deepcopy(self.confirm),
            "sampler": copy.deepcopy(self.sampler),
            "quality": copy.deepcopy(self.quality),
            "pruning": copy.deepcopy(self.pruning),
            "space": {k: d.as_spec() for k, d in self.space.items()},
            "fixed": copy.deepcopy(self.fixed),
        }

    def measurement_identity(self) -> dict[str, Any]:
        """The fields that make two runs' measurements comparable; resuming a study requires them equal.

        The trial count, timeouts, sampler, seed and confirmation settings may change between runs of one
        study; the model, device, workload, measuring, fidelity, objectives and search space may not.
        """
        d = self.to_dict()
        if d["workload"].get("batch_size") == 1:  # studies from before batch_size existed decoded one sequence
            del d["workload"]["batch_size"]
        if d["runtime"].get("prefill_graph") is False:  # and those from before prefill_graph launched every prefill
            del d["runtime"]["prefill_graph"]
        if d["runtime"].get("prefill_segment") == 0:  # ... and fed every prompt whole
            del d["runtime"]["prefill_segment"]
        return {
            "model": d["model"], "workload": d["workload"], "bench": d["bench"], "runtime": d["runtime"],
            "fidelity": d["fidelity"],
            "objectives": d["study"]["objectives"], "space": d["space"], "fixed": d["fixed"],
        }


# ---- reading -------------------------------------------------------------------------------------
def _err(source: str, problem: str) -> UserError:
    return UserError(f"experiment {source}: {problem}")


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"experiment file {str(p)!r} not found: pass an existing .toml (e.g. experiments/quickstart.toml)")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"experiment {p}: not valid TOML ({exc}); fix the file") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise UserError(f"experiment {p}: cannot read it ({exc}); pass a UTF-8 .toml file") from None


def load_spec(path: str | Path | None = None) -> ExperimentSpec:
    """Read and validate a spec file; None loads the packaged quickstart."""
    p = Path(path) if path is not None else packaged_quickstart()
    return parse_spec(read_toml(p), str(p))


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k not in ("space", "fixed"):
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, Mapping) and isinstance(out.get(k), dict):
            merged = dict(out[k])
            merged.update(copy.deepcopy(dict(v)))
            out[k] = merged
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_spec(doc: Mapping[str, Any], source: str = "<spec>") -> ExperimentSpec:
    """Validate a spec document (already parsed TOML) and fill in defaults."""
    if not isinstance(doc, Mapping):
        raise _err(source, "top level must be a table")
    known = set(_SECTIONS) | {"space", "fixed", "device"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise _err(source, f"unknown section(s) {unknown}: known sections are {sorted(known)}")
    overrides = doc.get("device", {}) or {}
    if not isinstance(overrides, Mapping):
        raise _err(source, "[device] must hold tables like [device.cpu.space]")
    bad = sorted(set(overrides) - set(DEVICE_TYPES))
    if bad:
        raise _err(source, f"unknown device type(s) {bad} under [device]: use {list(DEVICE_TYPES)}")
    for dtype_name, sub in overrides.items():
        if not isinstance(sub, Mapping):
            raise _err(source, f"[device.{dtype_name}] must be a table of sections")
        inner_bad = sorted(set(sub) - (known - {"device"}))
        if inner_bad:
            raise _err(source, f"unknown section(s) {inner_bad} under [device.{dtype_name}]")
    base = {k: v for k, v in doc.items() if k != "device"}
    spec = _build(base, source)
    spec.device_overrides = {k: copy.deepcopy(dict(v)) for k, v in overrides.items()}
    # Validate each override now (an error must surface before any run, whichever device is used).
    for dtype_name, sub in spec.device_overrides.items():
        _build(_deep_merge(base, sub), f"{source} [device.{dtype_name}]")
    spec.raw_doc = copy.deepcopy(dict(base))  # type: ignore[attr-defined]
    return spec


def apply_device_overrides(spec: ExperimentSpec, device_type: str) -> ExperimentSpec:
    """The spec with its `[device.<device_type>]` tables merged in (same spec if there are none)."""
    over = spec.device_overrides.get(device_type)
    if not over:
        return spec
    base = getattr(spec, "raw_doc", None)
    if base is None:
        return spec
    out = _build(_deep_merge(base, over), spec.source)
    out.device_overrides = spec.device_overrides
    out.raw_doc = _deep_merge(base, over)  # type: ignore[attr-defined]
    out.notes = list(spec.notes) + [f"applied [device.{device_type}] overrides from the experiment"]
    return out


def _enqueue_entries(source: str, entries: Any) -> list[dict[str, Any]]:
    """[study] enqueue: a list of tables of knob values (knobs left out take the default's values)."""
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) and e for e in entries):
        raise _err(source, "[study] enqueue must be a list of knob tables, e.g. [{backend = \"native\", chunk_size = 128}]")
    out = []
    for n, entry in enumerate(entries, 1):
        unknown = sorted(set(entry) - set(KNOBS))
        if unknown:
            raise _err(source, f"[study] enqueue entry {n}: unknown knob(s) {unknown}; knobs are {list(KNOBS)}")
        out.append(dict(entry))
    return out


def _section(doc: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    raw = doc.get(name, {}) or {}
    if not isinstance(raw, Mapping):
        raise _err(source, f"[{name}] must be a table")
    defaults = _SECTIONS[name]
    unknown = sorted(set(raw) - set(defaults))
    if unknown:
        raise _err(source, f"unknown key(s) {unknown} in [{name}]: known keys are {sorted(defaults)}")
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(dict(raw)))
    return out


def _int(source: str, where: str, value: Any, low: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(source, f"{where} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise _err(source, f"{where} must be >= {low}, got {value}")
    return value


def _num(source: str, where: str, value: Any, positive: bool = True, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise _err(source, f"{where} must be a number, got {value!r}")
    if positive and not float(value) > 0:
        raise _err(source, f"{where} must be > 0, got {value!r}")
    return float(value)


def normalize_sampler(name: Any, source: str = "--sampler") -> str:
    key = str(name).strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r} ({source}): use one of {', '.join(SAMPLERS)}")
    return key


def normalize_knob_value(knob: str, value: Any, where: str) -> Any:
    """One knob value in canonical form (backend aliases resolved, ints checked); UserError otherwise."""
    if knob == "backend":
        return normalize_backend(str(value))
    if knob == "decode_mode":
        mode = str(value).strip().lower()
        if mode not in DECODE_MODES:
            raise UserError(f"{where}: unknown decode_mode {value!r}: use {', '.join(DECODE_MODES)}")
        return mode
    if isinstance(value, bool):
        raise UserError(f"{where}: {knob} must be an integer, got {value!r}")
    try:
        n = int(str(value).strip()) if isinstance(value, str) else value
    except ValueError:
        n = None
    if not isinstance(n, int):
        raise UserError(f"{where}: {knob} must be an integer, got {value!r}")
    try:
        check_knob_bounds(knob, n)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return n


def parse_dimension(knob: str, value: Any, where: str) -> Dimension:
    """`[choices]` or `{low, high, step, log}` -> Dimension; an empty list or range is an error."""
    if knob not in KNOBS:
        raise UserError(f"{where}: unknown knob {knob!r}: known knobs are {', '.join(KNOBS)}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise UserError(f"{where}: {knob} has an empty list of choices: give at least one value")
        vals: list[Any] = []
        for v in value:
            nv = normalize_knob_value(knob, v, where)
            if nv not in vals:
                vals.append(nv)
        return Dimension(knob, tuple(vals))
    if isinstance(value, Mapping):
        if knob in ("backend", "decode_mode"):
            raise UserError(f"{where}: {knob} takes a list of choices, not a range")
        unknown = sorted(set(value) - {"low", "high", "step", "log"})
        if unknown or "low" not in value or "high" not in value:
            raise UserError(f"{where}: {knob} range must be {{low = .., high = .., step = .., log = ..}}"
                            + (f"; unknown key(s) {unknown}" if unknown else ""))
        low = normalize_knob_value(knob, value["low"], where)
        high = normalize_knob_value(knob, value["high"], where)
        step = value.get("step", 1)
        log = value.get("log", False)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise UserError(f"{where}: {knob} range step must be an integer >= 1, got {step!r}")
        if not isinstance(log, bool):
            raise UserError(f"{where}: {knob} range log must be true or false, got {log!r}")
        if log and step != 1:
            raise UserError(f"{where}: {knob} range cannot have both log = true and step = {step}: drop one")
        if log and low < 1:
            raise UserError(f"{where}: {knob} log range needs low >= 1")
        if high < low:
            raise UserError(f"{where}: {knob} range is empty (low={low} > high={high}): swap or fix the bounds")
        return Dimension(knob, None, low, high, step, log)
    # A scalar in [space] is a one-value dimension (same as [fixed]).
    return Dimension(knob, (normalize_knob_value(knob, value, where),))


def _build(doc: Mapping[str, Any], source: str) -> ExperimentSpec:
    study = _section(doc, "study", source)
    model = _section(doc, "model", source)
    workload = _section(doc, "workload", source)
    bench = _section(doc, "bench", source)
    runtime = _section(doc, "runtime", source)
    fidelity = _section(doc, "fidelity", source)
    trial = _section(doc, "trial", source)
    confirm = _section(doc, "confirm", source)
    sampler = _section(doc, "sampler", source)
    quality = _section(doc, "quality", source)
    pruning = _section(doc, "pruning", source)

    # [study]
    if not isinstance(study["name"], str) or not study["name"].strip():
        raise _err(source, "[study] name must be a non-empty string")
    _int(source, "[study] n_trials", study["n_trials"], 1)
    study["sampler"] = normalize_sampler(study["sampler"], f"[study] sampler in {source}")
    _int(source, "[study] seed", study["seed"], 0)
    if study["timeout_s"] is not None:
        study["timeout_s"] = _num(source, "[study] timeout_s", study["timeout_s"])
    objectives = study["objectives"]
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not objectives:
        raise _err(source, "[study] objectives must be a non-empty list such as [\"prefill_tok_s\", \"decode_tok_s\"]")
    study["objectives"] = [str(o) for o in objectives]
    study["enqueue"] = _enqueue_entries(source, study["enqueue"])
    if not isinstance(study["shipped_config"], bool):
        raise _err(source, "[study] shipped_config must be true or false")

    # [model]
    if not isinstance(model["name"], str) or not model["name"].strip():
        raise _err(source, "[model] name must be a preset name or a checkpoint directory")
    if not isinstance(model["device"], str):
        raise _err(source, "[model] device must be a string (auto, cpu, cuda, cuda:N, mps)")
    dtype = DTYPE_NAMES.get(str(model["dtype"]).lower())
    if dtype is None:
        raise _err(source, f"[model] dtype {model['dtype']!r} is not supported: use float32, bfloat16 or float16")
    model["dtype"] = dtype
    if not isinstance(model["compile"], bool):
        raise _err(source, f"[model] compile must be true or false, got {model['compile']!r}")
    _int(source, "[model] seed", model["seed"], 0)

    # [workload]
    from xlstm_tune.bench.workload import parse_lengths

    try:
        workload["context_lens"] = parse_lengths(workload["context_lens"], "[workload] context_lens")
    except UserError as exc:
        raise _err(source, str(exc)) from None
    _int(source, "[workload] new_tokens", workload["new_tokens"], 1)
    _int(source, "[workload] decode_context_len", workload["decode_context_len"], 1, allow_none=True)
    _int(source, "[workload] prompt_seed", workload["prompt_seed"], 0)
    _int(source, "[workload] batch_size", workload["batch_size"], 1)
    for key in ("prompt", "prompt_file"):
        if workload[key] is not None and (not isinstance(workload[key], str) or not workload[key].strip()):
            raise _err(source, f"[workload] {key} must be a non-empty string (or left out)")
    if workload["prompt"] is not None and workload["prompt_file"] is not None:
        raise _err(source, "[workload] has both prompt and prompt_file: keep one")

    # objectives need the context lengths
    for obj in study["objectives"]:
        m = _CTX_OBJECTIVE.match(obj)
        if obj in OBJECTIVE_BASES:
            continue
        if m and int(m.group(1)) in workload["context_lens"]:
            continue
        raise _err(source, f"unknown objective {obj!r}: use prefill_tok_s, decode_tok_s or prefill_tok_s_ctx<L> "
                           f"for a measured length L in {workload['context_lens']}")
    if len(set(study["objectives"])) != len(study["objectives"]):
        raise _err(source, "[study] objectives lists the same objective twice")

    # [bench]
    for key, low in (("warmup", 0), ("repeats", 1), ("max_rounds", 1)):
        _int(source, f"[bench] {key}", bench[key], low)
    _num(source, "[bench] max_cv", bench["max_cv"])
    _int(source, "[bench] busy_retries", bench["busy_retries"], 0)
    _num(source, "[bench] max_other_cpu", bench["max_other_cpu"])

    # [runtime]
    try:
        runtime.update({k: v for k, v in settings_from_mapping(runtime, "[runtime]").to_dict().items() if k in runtime})
    except UserError as exc:
        raise _err(source, str(exc)) from None

    # [fidelity]
    fidelity["rel_tol"] = _num(source, "[fidelity] rel_tol", fidelity["rel_tol"], allow_none=True)
    g = fidelity["min_greedy_agreement"]
    if g is not None:
        g = _num(source, "[fidelity] min_greedy_agreement", g, positive=False)
        if not 0.0 <= g <= 1.0:
            raise _err(source, f"[fidelity] min_greedy_agreement must be in 0..1, got {g}")
        fidelity["min_greedy_agreement"] = g
    _int(source, "[fidelity] prompt_len", fidelity["prompt_len"], 1)
    _int(source, "[fidelity] decode_steps", fidelity["decode_steps"], 0)

    # [trial], [confirm], [sampler]
    trial["timeout_s"] = _num(source, "[trial] timeout_s", trial["timeout_s"])
    trial["worker_start_timeout_s"] = _num(source, "[trial] worker_start_timeout_s", trial["worker_start_timeout_s"])
    for key, low in (("top_k", 0), ("rounds", 1), ("repeats", 1), ("max_candidates", 1), ("min_rounds", 2)):
        _int(source, f"[confirm] {key}", confirm[key], low)
    confirm["confidence"] = _num(source, "[confirm] confidence", confirm["confidence"])
    if not 0.5 <= confirm["confidence"] < 1.0:
        raise _err(source, f"[confirm] confidence must be in 0.5..1 (e.g. 0.95), got {confirm['confidence']}")
    confirm["max_trade"] = _num(source, "[confirm] max_trade", confirm["max_trade"], positive=False)
    if not 0.0 <= confirm["max_trade"] < 1.0:
        raise _err(source, f"[confirm] max_trade is the fraction of a phase a winner may lose, in 0..1 "
                           f"(e.g. 0.05), got {confirm['max_trade']}")
    _int(source, "[sampler] n_startup_trials", sampler["n_startup_trials"], 0, allow_none=True)
    _int(source, "[sampler] population_size", sampler["population_size"], 2, allow_none=True)

    # [quality]
    judge = str(quality["judge"]).strip().lower()
    if judge not in ("builtin", "ollama", "openai", "none"):
        raise _err(source, f"[quality] judge {quality['judge']!r} is unknown: use builtin, ollama, openai or none")
    quality["judge"] = judge
    if judge in ("ollama", "openai") and not (quality["judge_url"] and quality["judge_model"]):
        raise _err(source, f"[quality] judge = {judge!r} needs judge_url and judge_model")
    if not isinstance(quality["perplexity"], bool):
        raise _err(source, f"[quality] perplexity must be true or false, got {quality['perplexity']!r}")

    # [pruning]
    if not isinstance(pruning["enabled"], bool):
        raise _err(source, f"[pruning] enabled must be true or false, got {pruning['enabled']!r}")
    for key in ("margin", "slow_factor", "screen_margin"):
        v = _num(source, f"[pruning] {key}", pruning[key])
        if v is not None and v < 1.0:
            raise _err(source, f"[pruning] {key} must be >= 1 (a factor), got {v}")
        pruning[key] = v
    pruning["noise_k"] = _num(source, "[pruning] noise_k", pruning["noise_k"], positive=False)
    pruning["slow_min_s"] = _num(source, "[pruning] slow_min_s", pruning["slow_min_s"], positive=False)
    if pruning["noise_k"] < 0 or pruning["slow_min_s"] < 0:  # type: ignore[operator]
        raise _err(source, "[pruning] noise_k and slow_min_s must be >= 0")
    _int(source, "[pruning] min_trials", pruning["min_trials"], 1)

    # [space] and [fixed]
    raw_space = doc.get("space", {}) or {}
    raw_fixed = doc.get("fixed", {}) or {}
    if not isinstance(raw_space, Mapping) or not isinstance(raw_fixed, Mapping):
        raise _err(source, "[space] and [fixed] must be tables of knob = value")
    space: dict[str, Dimension] = {}
    for knob, value in raw_space.items():
        try:
            space[knob] = parse_dimension(knob, value, f"[space] {knob}")
        except UserError as exc:
            raise _err(source, str(exc)) from None
    fixed: dict[str, Any] = {}
    for knob, value in raw_fixed.items():
        if knob not in KNOBS:
            raise _err(source, f"[fixed]: unknown knob {knob!r}: known knobs are {', '.join(KNOBS)}")
        if knob in space:
            raise _err(source, f"knob {knob!r} is both in [space] and [fixed]: keep one")
        try:
            fixed[knob] = normalize_knob_value(knob, value, f"[fixed] {knob}")
        except UserError as exc:
            raise _err(source, str(exc)) from None
    if not space:
        raise _err(source, "[space] is empty: give at least one knob with choices, e.g. chunk_size = [16, 32, 64]")
    return ExperimentSpec(source=source, study=study, model=model, workload=workload, bench=bench,
                          runtime=runtime, fidelity=fidelity, trial=trial, confirm=confirm, sampler=sampler, quality=quality,
                          space=space, fixed=fixed, pruning=pruning)


# ---- CLI overrides -------------------------------------------------------------------------------
def _apply_config(s: ExperimentSpec, path: str | Path) -> None:
    """A runtime configuration file (configs/*.toml) on a study: settings as flags, knobs measured first."""
    from xlstm_tune.runtime.config_file import load_config

    cfg = load_config(path)
    settings = dict(cfg.settings)
    if "compile" in settings:
        s.model["compile"] = bool(settings.pop("compile"))
    if settings.get("dtype") is not None:
        s.model["dtype"] = settings.pop("dtype")
    settings.pop("dtype", None)
    s.runtime.update({k: v for k, v in settings.items() if v is not None})
    if cfg.knobs and cfg.knobs not in s.study["enqueue"]:
        s.study["enqueue"] = [dict(cfg.knobs), *s.study["enqueue"]]


def apply_overrides(spec: ExperimentSpec, **over: Any) -> ExperimentSpec:
    """Flags over the spec. Keys: study_name, n_trials, sampler, seed, timeout, model, device, dtype,
    compile, context_lens, new_tokens, repeats, prompt, prompt_file, trial_timeout, knobs (knob -> list
    of values: one value fixes the knob, several make it a categorical dimension), config (a runtime
    configuration file: its settings are applied like flags, its knobs measured first), runtime (settings
    flags: threads, interop_threads, tf32_cell, fused_decode, triton_gemv, decode_pdl, prefill_graph). None means
    "not given"."""
    s = copy.deepcopy(spec)
    if over.get("config") is not None:
        _apply_config(s, over["config"])
    runtime_flags = {k: v for k, v in (over.get("runtime") or {}).items() if v is not None}
    if runtime_flags:
        s.runtime.update({k: v for k, v in settings_from_mapping(
            {**s.runtime, **runtime_flags}, "flags").to_dict().items() if k in runtime_flags})
    if over.get("study_name") is not None:
        s.study["name"] = over["study_name"]
    if over.get("n_trials") is not None:
        if over["n_trials"] < 1:
            raise UserError(f"--n-trials must be >= 1, got {over['n_trials']}")
        s.study["n_trials"] = over["n_trials"]
    if over.get("sampler") is not None:
        s.study["sampler"] = normalize_sampler(over["sampler"])
    if over.get("seed") is not None:
        if over["seed"] < 0:
            raise UserError(f"--seed must be >= 0, got {over['seed']}")
        s.study["seed"] = over["seed"]
    if over.get("timeout") is not None:
        if not over["timeout"] > 0:
            raise UserError(f"--timeout must be > 0 seconds, got {over['timeout']}")
        s.study["timeout_s"] = float(over["timeout"])
    if over.get("trial_timeout") is not None:
        if not over["trial_timeout"] > 0:
            raise UserError(f"--trial-timeout must be > 0 seconds, got {over['trial_timeout']}")
        s.trial["timeout_s"] = float(over["trial_timeout"])
    for key in ("model", "device"):
        if over.get(key) is not None:
            s.model["name" if key == "model" else "device"] = over[key]
    if over.get("dtype") is not None:
        dt = DTYPE_NAMES.get(str(over["dtype"]).lower())
        if dt is None:
            raise UserError(f"--dtype {over['dtype']!r} is not supported: use float32, bfloat16 or float16")
        s.model["dtype"] = dt
    if over.get("compile") is not None:
        s.model["compile"] = bool(over["compile"])
    if over.get("early_stopping") is not None:
        s.pruning["enabled"] = bool(over["early_stopping"])
    if over.get("context_lens"):
        s.workload["context_lens"] = list(over["context_lens"])
        bad = [o for o in s.study["objectives"] if _CTX_OBJECTIVE.match(o)
               and int(_CTX_OBJECTIVE.match(o).group(1)) not in s.workload["context_lens"]]  # type: ignore[union-attr]
        if bad:
            raise UserError(f"objective(s) {bad} name a context length that --prefill-len drops: keep that length")
    if over.get("new_tokens") is not None:
        if over["new_tokens"] < 1:
            raise UserError(f"--new-tokens must be >= 1, got {over['new_tokens']}")
        s.workload["new_tokens"] = over["new_tokens"]
    if over.get("repeats") is not None:
        if over["repeats"] < 1:
            raise UserError(f"--repeats must be >= 1, got {over['repeats']}")
        s.bench["repeats"] = over["repeats"]
    if over.get("objectives"):
        s.study["objectives"] = list(over["objectives"])
        for obj in s.study["objectives"]:
            m = _CTX_OBJECTIVE.match(obj)
            if obj not in OBJECTIVE_BASES and not (m and int(m.group(1)) in s.workload["context_lens"]):
                raise UserError(f"unknown objective {obj!r}: use prefill_tok_s, decode_tok_s or prefill_tok_s_ctx<L> "
                                f"for a measured length L in {s.workload['context_lens']}")
    if over.get("prompt") is not None or over.get("prompt_file") is not None:
        s.workload["prompt"] = over.get("prompt")
        s.workload["prompt_file"] = over.get("prompt_file")
    for knob, values in (over.get("knobs") or {}).items():
        if not values:
            continue
        dim = parse_dimension(knob, list(values), f"--{knob.replace('_', '-')}")
        s.fixed.pop(knob, None)
        s.space[knob] = dim
    if hasattr(spec, "raw_doc"):
        s.raw_doc = spec.raw_doc  # type: ignore[attr-defined]
    return s
