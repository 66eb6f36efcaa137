"""Runtime configuration files (`configs/*.toml`): knobs plus process-wide settings, loaded by `--config`.

    [knobs]     backend, chunk_size, heads_per_band, workers, t_inner, streams, decode_mode
    [runtime]   compile, dtype, threads, interop_threads, tf32_cell, fused_decode, triton_gemv, decode_pdl,
                prefill_graph, prefill_segment

Every key is optional: a file sets what it names and the rest comes from the other levels of the
precedence chain (CLI flag > best.json > environment > config file > built-in default). A file is read
strictly (unknown tables or keys, bad values: one UserError naming the file and the key).

The package ships one starting point per device class (`shipped_config("cpu" | "cuda" | "mps")`); the
repository's top-level `configs/` folder holds the same files for people to read and copy.
"""
from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError

SECTIONS = ("knobs", "runtime")
DEVICE_CLASSES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class RuntimeConfig:
    """A parsed configuration file: the knobs and the settings it sets (validated, canonical spellings)."""

    path: str
    knobs: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """One table of knobs and settings: the config-file level of `runtime.settings.resolve_runtime`."""
        return {**self.settings, **self.knobs}


def _fail(path: str | Path, problem: str) -> UserError:
    return UserError(f"config file {path}: {problem}")


def parse_config(doc: Any, path: str | Path = "<config>") -> RuntimeConfig:
    """Validate a parsed configuration document."""
    from xlstm_tune.runtime.options import KNOBS, RuntimeOptions, _as_bool
    from xlstm_tune.runtime.settings import settings_from_mapping

    if not isinstance(doc, dict):
        raise _fail(path, "top level must be a table")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise _fail(path, f"unknown table(s) {unknown}: use [knobs] and [runtime]")
    knobs, settings = doc.get("knobs", {}), doc.get("runtime", {})
    if not isinstance(knobs, dict) or not isinstance(settings, dict):
        raise _fail(path, "[knobs] and [runtime] must be tables of key = value")
    bad = sorted(set(knobs) - set(KNOBS))
    if bad:
        raise _fail(path, f"unknown knob(s) {bad} in [knobs]; knobs are {list(KNOBS)}")
    try:
        opts = RuntimeOptions().replace(**knobs)
        parsed = settings_from_mapping(settings, "[runtime]")
        if "compile" in settings:
            _as_bool("[runtime] compile", settings["compile"])
    except UserError as exc:
        raise _fail(path, str(exc)) from None
    canon_knobs = {k: getattr(opts, k) for k in knobs}
    canon_settings = {k: getattr(parsed, k) for k in settings if k != "compile"}
    if "compile" in settings:
        canon_settings["compile"] = opts.replace(compile=settings["compile"]).compile
    return RuntimeConfig(str(path), canon_knobs, canon_settings)


def load_config(path: str | Path) -> RuntimeConfig:
    """Read and validate a configuration file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} not found: pass an existing .toml (e.g. configs/cpu.toml)")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise _fail(p, f"not valid TOML ({exc}); fix the file") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise _fail(p, f"cannot read it ({exc}); pass a UTF-8 .toml file") from None
    return parse_config(doc, p)


def shipped_config(device_type: str) -> Path:
    """The packaged starting configuration for a device class (`cpu`, `cuda` or `mps`).

    A study can measure it first (enqueue its knobs) to learn from a known-good point on the device.
    """
    kind = str(device_type).strip().lower().partition(":")[0]
    if kind not in DEVICE_CLASSES:
        raise UserError(f"no shipped config for device type {device_type!r}: use one of {list(DEVICE_CLASSES)}")
    return Path(str(importlib.resources.files("xlstm_tune") / "configs" / f"{kind}.toml"))
