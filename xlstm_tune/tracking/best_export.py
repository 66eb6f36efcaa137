"""Build and export best.json, the file production loads (docs/DESIGN.md §4 "best.json").

The schema, validation and atomic write live in `runtime.best_file` (runtime reads the file and must not
import upward); this module only assembles the content from a study's results.

`runtime` records the settings the study measured with (compile, dtype, thread counts, the CUDA
switches): a configuration is only the one measured when all of them hold too. Each context's `env`
is the environment form of its knobs plus those settings, so `env` alone reproduces the measurement.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xlstm_tune import __version__
from xlstm_tune.bench.stats import Summary
from xlstm_tune.errors import UserError
from xlstm_tune.runtime.best_file import KNOB_FIELDS, SCHEMA, read_best, validate_best, write_best
from xlstm_tune.runtime.options import ENV_VARS, RuntimeOptions
from xlstm_tune.runtime.settings import settings_from_mapping
from xlstm_tune.tracking.provenance import git_commit, host_info, now_iso
from xlstm_tune.tracking.study_files import json_safe

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def knob_env(knobs: Mapping[str, Any], runtime: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Environment-variable form of the knobs, plus the runtime settings when given (see the docstring)."""
    env = RuntimeOptions(**dict(knobs)).to_env()
    env.pop(ENV_VARS["compile"], None)
    if runtime:
        if runtime.get("compile") is not None:
            env[ENV_VARS["compile"]] = "1" if runtime["compile"] else "0"
        env.update(settings_from_mapping(runtime, "runtime").to_env())
    return env


def _normalise_knobs(knobs: Any, where: str) -> dict[str, Any]:
    if not isinstance(knobs, Mapping):
        raise UserError(f"{where}: knobs must be a mapping of {list(KNOB_FIELDS)}")
    extra = sorted(set(knobs) - set(KNOB_FIELDS) - {"compile"})
    if extra:
        raise UserError(f"{where}: unknown knob(s) {extra}; known are {list(KNOB_FIELDS)}")
    missing = [k for k in KNOB_FIELDS if k not in knobs]
    if missing:
        raise UserError(f"{where}: missing knob(s) {missing}; a best.json entry needs all of {list(KNOB_FIELDS)}")
    opts = RuntimeOptions(**{k: knobs[k] for k in KNOB_FIELDS})  # validates and normalises spellings
    return opts.knobs()


def _metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        out[str(name)] = value.metric_dict() if isinstance(value, Summary) else value
    return json_safe(out)


def _check_winner(ctx: Mapping[str, Any], where: str) -> None:
    """`winner` is optional; when present it is a bool, and "no winner" means the default, with a reason."""
    if "winner" not in ctx:
        return
    winner = ctx["winner"]
    if not isinstance(winner, bool):
        raise UserError(f"{where}: winner must be true or false, got {winner!r}")
    if winner:
        return
    reason = ctx.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise UserError(f"{where}: an entry without a winner needs a non-empty reason")
    if ctx.get("is_default") is not True:
        raise UserError(f"{where}: an entry without a winner keeps the default configuration (is_default true)")


def build_best(contexts: Sequence[Mapping[str, Any]], provenance: Mapping[str, Any],
               runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble a best.json document (schema `xlstm_tune.best/1`) and validate it.

    `runtime`: the settings the study measured with (`compile` plus `RuntimeSettings` fields).

    Each context: `context_len`, `knobs` (all seven; spellings normalised, `compile` ignored), `metrics`
    (Summary objects or `{"median", "p20", "p80", "cv"}` dicts or scalars), `fidelity`, and optionally
    `trial_number` and `mlflow_run_id`. A confirmed entry also says `winner` (true: it beat the default
    significantly; false: no candidate did and the entry is the default, `is_default` true, with a
    non-empty `reason`). Provenance fields the caller leaves out that this process can
    know (`time`, `git_commit`, `os`, `torch_version`) are filled in; the rest must be given.
    Raises UserError naming the first problem.
    """
    if not contexts:
        raise UserError("no results to export: the study has no completed trial that passed fidelity")
    entries: list[dict[str, Any]] = []
    for i, ctx in enumerate(contexts):
        where = f"context {ctx.get('context_len', i)!r}"
        knobs = _normalise_knobs(ctx.get("knobs"), where)
        _check_winner(ctx, where)
        entry: dict[str, Any] = {
            "context_len": ctx.get("context_len"),
            "knobs": knobs,
            "env": knob_env(knobs, runtime),
            "metrics": _metrics(ctx.get("metrics") or {}),
            "fidelity": json_safe(dict(ctx.get("fidelity") or {})),
        }
        for key in ("trial_number", "mlflow_run_id"):
            entry[key] = ctx.get(key)
        for key, value in ctx.items():  # keep any extra fields the study adds (e.g. prompt length)
            if key not in entry and key != "knobs":
                entry[key] = json_safe(value)
        entries.append(entry)
    entries.sort(key=lambda e: e["context_len"] if isinstance(e["context_len"], int) else -1)

    prov: dict[str, Any] = dict(provenance)
    prov.setdefault("time", now_iso())
    if "git_commit" not in prov:
        prov["git_commit"] = git_commit(_PACKAGE_DIR)
    host = host_info()
    prov.setdefault("os", host["os"])
    prov.setdefault("torch_version", host["torch_version"])
    prov.setdefault("xlstm_tune_version", __version__)
    data: dict[str, Any] = {"schema": SCHEMA, "contexts": entries}
    if runtime is not None:
        settings = settings_from_mapping(runtime, "runtime").to_dict()
        data["runtime"] = json_safe({"compile": runtime.get("compile"), **settings})
    data["provenance"] = json_safe(prov)
    return validate_best(data, "<built best.json>")


def export_best(path: str | Path, data: dict[str, Any]) -> Path:
    """Validate and write best.json atomically (never a half-written file production could load)."""
    return write_best(path, data)


def check_best(path: str | Path) -> dict[str, Any]:
    """Read and validate a best.json; UserError with a one-line message if it is not usable."""
    return read_best(path)
