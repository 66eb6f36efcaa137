"""best.json: the versioned file a study exports and production loads (docs/DESIGN.md §4).

It lives in runtime/ because `RuntimeOptions.from_best` reads it and runtime must not import upward;
tracking/ writes it through `write_best`. Reading never executes code: plain JSON, checked field by field.

Layout (schema "xlstm_tune.best/1")::

    {
      "schema": "xlstm_tune.best/1",
      "contexts": [                         # one entry per measured context length, ascending
        {"context_len": 2048,
         "knobs": {backend, chunk_size, heads_per_band, workers, t_inner, streams, decode_mode},
         "env": {"XLSTM_CHUNKWISE_BACKEND": ..., ...},
         "metrics": {"prefill_tok_s": {"median", "p20", "p80", "cv"}, "decode_tok_s": {...}, ...},
         "fidelity": {"passed": true, "max_rel_err": ..., ...},
         "trial_number": 7, "mlflow_run_id": "..."}
      ],
      "runtime": {compile, dtype, threads, interop_threads, tf32_cell, fused_decode, triton_gemv, decode_pdl,
                  prefill_graph, prefill_segment},
      "provenance": {device_name, os, torch_version, model_id, model_config_hash, study_name,
                     trial_number, mlflow_run_id, git_commit, time}
    }

`runtime` holds the process-wide settings the study measured with (`runtime.settings`); files written
before it existed load without it (then those settings come from the lower levels of the precedence
chain). Unknown top-level keys, knobs or runtime settings are refused. A best.json knows what it is for:
`check_target` refuses to apply it to another model (config hash) or device (name).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from xlstm_tune.atomic_files import write_json_atomic
from xlstm_tune.errors import UserError

SCHEMA = "xlstm_tune.best/1"
KNOB_FIELDS = ("backend", "chunk_size", "heads_per_band", "workers", "t_inner", "streams", "decode_mode")
CONTEXT_FIELDS = ("context_len", "knobs", "env", "metrics", "fidelity")
TOP_LEVEL_FIELDS = ("schema", "contexts", "runtime", "provenance")
PROVENANCE_FIELDS = (
    "device_name", "os", "torch_version", "model_id", "model_config_hash",
    "study_name", "trial_number", "mlflow_run_id", "git_commit", "time",
)


def _fail(path: str | Path, problem: str) -> UserError:
    return UserError(f"invalid best.json {path}: {problem}; re-export it with `python -m xlstm_tune export`")


def validate_best(data: Any, path: str | Path = "<best.json>") -> dict[str, Any]:
    """Check a parsed best.json; raise UserError naming the first problem."""
    from xlstm_tune.runtime.options import RuntimeOptions  # local: options imports this module lazily too

    if not isinstance(data, dict):
        raise _fail(path, "top level is not a JSON object")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise _fail(path, f"unknown schema {schema!r} (expected {SCHEMA!r})")
    unknown_top = sorted(set(data) - set(TOP_LEVEL_FIELDS))
    if unknown_top:
        raise _fail(path, f"unknown top-level key(s) {unknown_top} (known: {list(TOP_LEVEL_FIELDS)})")
    contexts = data.get("contexts")
    if not isinstance(contexts, list) or not contexts:
        raise _fail(path, "'contexts' must be a non-empty list")
    seen = set()
    for i, entry in enumerate(contexts):
        if not isinstance(entry, dict):
            raise _fail(path, f"contexts[{i}] is not an object")
        missing = [f for f in CONTEXT_FIELDS if f not in entry]
        if missing:
            raise _fail(path, f"contexts[{i}] is missing {missing}")
        if not isinstance(entry["context_len"], int) or entry["context_len"] < 1:
            raise _fail(path, f"contexts[{i}].context_len must be a positive integer")
        if entry["context_len"] in seen:
            raise _fail(path, f"context_len {entry['context_len']} appears twice")
        seen.add(entry["context_len"])
        knobs = entry["knobs"]
        if not isinstance(knobs, dict):
            raise _fail(path, f"contexts[{i}].knobs is not an object")
        missing = [k for k in KNOB_FIELDS if k not in knobs]
        if missing:
            raise _fail(path, f"contexts[{i}].knobs is missing {missing}")
        unknown = sorted(set(knobs) - set(KNOB_FIELDS))
        if unknown:
            raise _fail(path, f"contexts[{i}].knobs has unknown knob(s) {unknown}")
        try:
            RuntimeOptions(**knobs)
        except UserError as exc:
            raise _fail(path, f"contexts[{i}].knobs: {exc}") from None
        for name in ("env", "metrics", "fidelity"):
            if not isinstance(entry[name], dict):
                raise _fail(path, f"contexts[{i}].{name} is not an object")
    runtime = data.get("runtime")
    if runtime is not None:
        from xlstm_tune.runtime.options import _as_bool
        from xlstm_tune.runtime.settings import settings_from_mapping

        if not isinstance(runtime, dict):
            raise _fail(path, "'runtime' must be an object")
        try:
            settings_from_mapping(runtime, "runtime")
            if runtime.get("compile") is not None:
                _as_bool("runtime.compile", runtime["compile"])
        except UserError as exc:
            raise _fail(path, str(exc)) from None
    prov = data.get("provenance")
    if not isinstance(prov, dict):
        raise _fail(path, "'provenance' must be an object")
    missing = [f for f in PROVENANCE_FIELDS if f not in prov]
    if missing:
        raise _fail(path, f"provenance is missing {missing}")
    return data


def read_best(path: str | Path) -> dict[str, Any]:
    """Read and validate a best.json. Never unpickles or evaluates anything."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"best.json not found: {p}; pass the path written by `python -m xlstm_tune export`")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(p, f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    return validate_best(data, p)


def context_entry(best: dict[str, Any], context_len: int | None = None) -> dict[str, Any]:
    """The entry for `context_len`: the nearest measured length (ties go to the longer one).

    With no context length, the longest measured context is used: the setting that was proven on the
    most demanding prompt.
    """
    contexts = sorted(best["contexts"], key=lambda e: e["context_len"])
    if context_len is None:
        return contexts[-1]
    return min(contexts, key=lambda e: (abs(e["context_len"] - context_len), -e["context_len"]))


def knobs_for_context(best: dict[str, Any], context_len: int | None = None) -> dict[str, Any]:
    """The knobs of `context_entry(best, context_len)`."""
    return dict(context_entry(best, context_len)["knobs"])


def target_mismatches(best: dict[str, Any], *, model_id: str | None = None, config_hash: str | None = None,
                      device_name: str | None = None) -> list[str]:
    """How the target differs from what `best` was measured on: model (by config hash) and device name.

    A checkpoint copied to another path is the same model, so the id alone never counts; a field the
    file or the caller does not know is not compared.
    """
    prov = best.get("provenance") or {}
    out = []
    made_hash, made_id = prov.get("model_config_hash"), prov.get("model_id")
    if config_hash and made_hash and config_hash != made_hash:
        out.append(f"model {made_id!r} (config {str(made_hash)[:12]}), not {model_id!r} (config {config_hash[:12]})")
    made_dev = prov.get("device_name")
    if device_name and made_dev and device_name != made_dev:
        out.append(f"device {made_dev!r}, not {device_name!r}")
    return out


def check_target(best: dict[str, Any], path: str | Path, *, allow_mismatch: bool = False,
                 model_id: str | None = None, config_hash: str | None = None,
                 device_name: str | None = None) -> list[str]:
    """UserError if `best` was made for another model or device (unless `allow_mismatch`).

    Returns the mismatches (empty when it fits), so a caller that allowed them can say so.
    """
    found = target_mismatches(best, model_id=model_id, config_hash=config_hash, device_name=device_name)
    if found and not allow_mismatch:
        raise UserError(f"best.json {path} was measured on {'; '.join(found)}: export one for this model and "
                        f"device, or pass --allow-mismatch to apply it anyway")
    return found


def write_best(path: str | Path, data: dict[str, Any]) -> Path:
    """Validate then write atomically."""
    validate_best(data, path)
    return write_json_atomic(path, data)
