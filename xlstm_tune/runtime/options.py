"""RuntimeOptions: the knobs of the inference runtime, validated on construction.

Precedence when several sources give a knob (docs/DESIGN.md §4):
CLI flag > best.json (when asked for) > environment > config file > built-in default.
`merge` implements that layering; `from_env` and `from_best` read one source each.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError

BACKENDS = ("native", "queued", "ray")
DECODE_MODES = ("eager", "compiled", "graph")

# The seed system's backend keys, accepted everywhere a backend name is.
_BACKEND_ALIASES = {
    "queued_compiled_steps": "queued",
    "ray_compiled_steps": "ray",
    "native_compiled_autograd": "native",
}

# Knob -> environment variable (the seed system's names).
ENV_VARS = {
    "backend": "XLSTM_CHUNKWISE_BACKEND",
    "chunk_size": "XLSTM_CHUNK_SIZE",
    "heads_per_band": "XLSTM_MPS_HEADS_PER_BAND",
    "workers": "XLSTM_MPS_WORKERS",
    "t_inner": "XLSTM_T_INNER",
    "streams": "XLSTM_MPS_STREAMS",
    "decode_mode": "XLSTM_DECODE_MODE",
    "compile": "XLSTM_COMPILE",
}

KNOBS = ("backend", "chunk_size", "heads_per_band", "workers", "t_inner", "streams", "decode_mode")

# Sane bounds of the integer knobs (inclusive). A value outside is a typo or a unit mistake, never a
# setting worth measuring: chunks longer than 65,536 tokens exceed any prompt we measure, and more
# coordinator threads or streams than these only add contention. heads_per_band is also checked
# against the model (`check_for_model`).
KNOB_BOUNDS = {"chunk_size": (1, 65536), "heads_per_band": (1, 4096), "workers": (1, 256),
               "t_inner": (1, 65536), "streams": (0, 64)}


def check_knob_bounds(name: str, value: int) -> None:
    """UserError when an integer knob is outside its sane bounds (KNOB_BOUNDS)."""
    low, high = KNOB_BOUNDS[name]
    if value < low:
        raise UserError(f"{name} must be >= {low}, got {value}")
    if value > high:
        raise UserError(f"{name} must be <= {high} (a sane maximum), got {value}: pick a value in {low}..{high}")


def normalize_backend(name: str) -> str:
    """Map any accepted spelling (`chunkwise--queued_compiled_steps`, `queued_compiled_steps`, `queued`)."""
    key = str(name).strip().lower()
    key = key.removeprefix("chunkwise--")
    key = _BACKEND_ALIASES.get(key, key)
    if key not in BACKENDS:
        raise UserError(
            f"unknown backend {name!r}: use one of {', '.join(BACKENDS)} "
            f"(or the seed names {', '.join(_BACKEND_ALIASES)})"
        )
    return key


def seed_backend_key(backend: str) -> str:
    """The seed system's full key for a backend, e.g. `chunkwise--queued_compiled_steps`."""
    inverse = {v: k for k, v in _BACKEND_ALIASES.items()}
    return f"chunkwise--{inverse[normalize_backend(backend)]}"


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise UserError(f"{name} must be an integer, got {value!r}")
    try:
        as_int = int(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None
    return as_int


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name} must be a boolean (1/0, true/false), got {value!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """Knobs of the inference runtime.

    backend: prefill scheduler: `native` (one chunkwise-parallel call over all heads), `queued` (thread
        pool over head bands, step-blocks in strict time order), `ray` (one Ray actor per head band).
    chunk_size: tokens per chunk (prefill tile length / dispatch granularity).
    heads_per_band: heads processed together by one task; the last band may be ragged.
    workers: coordinator threads of the queued backend (not math threads).
    t_inner: timesteps unrolled inside one step-block call; must divide chunk_size.
    streams: device streams for the queued backend (0 = none; only where the torch build has them).
    decode_mode: `eager`, `compiled` (torch.compile of the step) or `graph` (captured device graph).
    compile: compile the prefill tile kernels (step-block, chunkwise tile) with torch.compile; off runs
        the same math eagerly (debugging, CPU tests). Not a tuning knob.
    """

    backend: str = "queued"
    chunk_size: int = 32
    heads_per_band: int = 4
    workers: int = 4
    t_inner: int = 4
    streams: int = 0
    decode_mode: str = "eager"
    compile: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        set_(self, "backend", normalize_backend(self.backend))
        for name in ("chunk_size", "heads_per_band", "workers", "t_inner", "streams"):
            set_(self, name, _as_int(name, getattr(self, name)))
        set_(self, "compile", _as_bool("compile", self.compile))
        mode = str(self.decode_mode).strip().lower()
        if mode not in DECODE_MODES:
            raise UserError(f"unknown decode_mode {self.decode_mode!r}: use one of {', '.join(DECODE_MODES)}")
        set_(self, "decode_mode", mode)
        for name in KNOB_BOUNDS:
            check_knob_bounds(name, getattr(self, name))
        if self.t_inner < 1 or self.chunk_size % self.t_inner != 0:
            raise UserError(
                f"t_inner={self.t_inner} must divide chunk_size={self.chunk_size}: "
                f"pick t_inner from the divisors of chunk_size"
            )

    # ---- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def knobs(self) -> dict[str, Any]:
        """The tuning knobs alone (no `compile`), as they appear in study files and best.json."""
        return {k: getattr(self, k) for k in KNOBS}

    def replace(self, **changes: Any) -> "RuntimeOptions":
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment-variable form, with the seed system's full backend key."""
        env = {ENV_VARS[k]: str(v) for k, v in self.knobs().items()}
        env[ENV_VARS["backend"]] = seed_backend_key(self.backend)
        env[ENV_VARS["compile"]] = "1" if self.compile else "0"
        return env

    def check_for_model(self, num_heads: int) -> None:
        """Checks that need the model: heads_per_band in 1..num_heads (a ragged last band is fine).

        `native` runs all heads in one call, so its heads_per_band is not used and not checked.
        """
        if self.backend != "native" and not 1 <= self.heads_per_band <= num_heads:
            raise UserError(
                f"heads_per_band={self.heads_per_band} must be in 1..{num_heads} (the model's heads per layer)"
            )

    # ---- sources -----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def env_overrides(cls, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Knob values set in the environment (only those present and non-empty)."""
        environ = os.environ if environ is None else environ
        found: dict[str, Any] = {}
        for knob, var in ENV_VARS.items():
            value = environ.get(var)
            if value is not None and value.strip() != "":
                found[knob] = value
        return found

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, base: "RuntimeOptions | None" = None) -> "RuntimeOptions":
        """Options from the seed system's environment variables, on top of `base` (default: built-ins)."""
        base = base or cls()
        overrides = cls.env_overrides(environ)
        try:
            return base.replace(**overrides)
        except UserError as exc:
            raise UserError(f"bad environment setting: {exc}") from None

    @classmethod
    def from_best(cls, path: str | Path, context_len: int | None = None, base: "RuntimeOptions | None" = None) -> "RuntimeOptions":
        """Options from a validated best.json (docs/DESIGN.md §4), for the nearest measured context length.

        The knobs and the file's `compile` setting; the process-wide settings it records (dtype, threads,
        CUDA switches) are `runtime.settings.RuntimeSettings`, applied by `resolve_runtime(...)`.
        """
        from xlstm_tune.runtime.best_file import context_entry, read_best

        best = read_best(path)
        knobs = dict(context_entry(best, context_len)["knobs"])
        compile_ = (best.get("runtime") or {}).get("compile")
        if compile_ is not None:
            knobs["compile"] = compile_
        return (base or cls()).replace(**knobs)

    @classmethod
    def merged(
        cls,
        *,
        cli: Mapping[str, Any] | None = None,
        best: str | Path | None = None,
        context_len: int | None = None,
        environ: Mapping[str, str] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> "RuntimeOptions":
        """Layer the sources: CLI flag > best.json > environment > config file > built-in default.

        The knobs alone; `runtime.settings.resolve_runtime` returns them with the process-wide settings.
        """
        from xlstm_tune.runtime.best_file import read_best
        from xlstm_tune.runtime.settings import resolve_runtime

        doc = read_best(best) if best is not None else None
        opts, _ = resolve_runtime(cli=cli, best=doc, best_path=best, context_len=context_len, environ=environ,
                                  config=config)
        return opts
