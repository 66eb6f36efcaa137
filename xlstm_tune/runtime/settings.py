"""RuntimeSettings: the process-wide settings that change speed but are not tuning knobs.

The knobs (`RuntimeOptions`) say how the model schedules its work; these say how the process around it
is set up: the weight dtype, torch's intra-op and inter-op thread counts, and the CUDA kernel switches
(TF32 cell products, fused batch-1 decode kernels, Triton GEMV, dependent launch of the decode kernels,
native prefill replayed from device graphs), and the length of the pieces prompts are fed in. A measurement is only reproducible when
all of them are the same, so the study records them, best.json carries them and `run`, `bench` and
`RuntimeOptions.from_best` apply them (docs/DESIGN.md §6a "best.json is what was measured").

Sources layer like the knobs (CLI flag > best.json > environment > config file > built-in default);
`resolve_runtime` layers both together. `None` for a thread count means "the device's default"
(`runtime.device.default_threads`), resolved by `apply`, which returns the values actually in force.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError

DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}

# Setting -> environment variable. The switches are read at call time (runtime/device.py, kernels/decode_triton.py).
SETTING_ENV_VARS = {
    "dtype": "XLSTM_DTYPE",
    "threads": "XLSTM_THREADS",
    "interop_threads": "XLSTM_INTEROP_THREADS",
    "tf32_cell": "XLSTM_TF32_CELL",
    "fused_decode": "XLSTM_FUSED_DECODE",
    "triton_gemv": "XLSTM_TRITON_GEMV",
    "decode_pdl": "XLSTM_DECODE_PDL",
    "prefill_graph": "XLSTM_PREFILL_GRAPH",
    "prefill_segment": "XLSTM_PREFILL_SEGMENT",
}
_SWITCHES = ("tf32_cell", "fused_decode", "triton_gemv", "decode_pdl", "prefill_graph")


def normalize_dtype(value: Any, where: str = "dtype") -> str:
    name = DTYPE_NAMES.get(str(value).strip().lower())
    if name is None:
        raise UserError(f"{where} {value!r} is not supported: use float32, bfloat16 or float16")
    return name


def _bool(name: str, value: Any) -> bool:
    from xlstm_tune.runtime.options import _as_bool

    return _as_bool(name, value)


def _threads(name: str, value: Any) -> int | None:
    """A thread count in 1..(CPUs this process may use); None keeps the device default."""
    if value is None:
        return None
    from xlstm_tune.runtime.device import available_cpus
    from xlstm_tune.runtime.options import _as_int

    n = _as_int(name, value)
    limit = available_cpus()
    if not 1 <= n <= limit:
        raise UserError(f"{name}={n} is outside 1..{limit} (the CPUs this process may use): pick a smaller count")
    return n


@dataclass(frozen=True)
class RuntimeSettings:
    """Process-wide settings that change speed.

    dtype: weight dtype (None: the model's default, float32).
    threads / interop_threads: torch's intra-op / inter-op threads (None: the device's default).
    tf32_cell: TF32 for the float32 cell products of bf16/fp16 models on CUDA (XLSTM_TF32_CELL).
    fused_decode: the fused batch-1 decode kernels on CUDA (XLSTM_FUSED_DECODE).
    triton_gemv: the Triton batch-1 GEMV on CUDA (XLSTM_TRITON_GEMV).
    decode_pdl: programmatic dependent launch of the fused decode kernels on Hopper and newer (XLSTM_DECODE_PDL).
    prefill_graph: the native backend's prefill captured once per prompt shape and replayed as a device
        graph (XLSTM_PREFILL_GRAPH; CUDA only, refused elsewhere; off by default).
    prefill_segment: prompts fed in pieces of a bounded set of lengths, this many tokens at most
        (XLSTM_PREFILL_SEGMENT; 0, the default, feeds them whole; runtime/prefill_segments.py).
    """

    dtype: str | None = None
    threads: int | None = None
    interop_threads: int | None = None
    tf32_cell: bool = True
    fused_decode: bool = True
    triton_gemv: bool = True
    decode_pdl: bool = True
    prefill_graph: bool = False
    prefill_segment: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.dtype is not None:
            set_(self, "dtype", normalize_dtype(self.dtype))
        for name in ("threads", "interop_threads"):
            set_(self, name, _threads(name, getattr(self, name)))
        for name in _SWITCHES:
            set_(self, name, _bool(name, getattr(self, name)))
        from xlstm_tune.runtime.prefill_segments import parse_segment

        set_(self, "prefill_segment", parse_segment(self.prefill_segment))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RuntimeSettings":
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """Environment form of the settings that are set (a None thread count or dtype is left out)."""
        env: dict[str, str] = {}
        for name, var in SETTING_ENV_VARS.items():
            value = getattr(self, name)
            if value is None:
                continue
            env[var] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def env_overrides(cls, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        environ = os.environ if environ is None else environ
        return {name: environ[var] for name, var in SETTING_ENV_VARS.items()
                if environ.get(var) is not None and environ[var].strip() != ""}

    def apply(self, device: Any, concurrent: int = 1) -> dict[str, Any]:
        """Put the settings in force for this process; returns what is in force (the record of a run).

        Threads: torch's intra-op count always; its inter-op count only before any inter-op work has
        started (torch allows one change), so the returned figure is read back, not assumed. The CUDA
        switches are written to the environment, where runtime/device.py reads them per call.
        `concurrent`: how many measuring processes share this machine (the CPU default divides by it).
        """
        import torch

        from xlstm_tune.runtime import device as dev

        if self.prefill_graph:
            dev.check_prefill_graphs(device)  # before anything is set: refused where there are no graphs
        threads = self.threads or dev.default_threads(device, concurrent)
        interop = self.interop_threads or dev.default_interop_threads(device)
        torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != interop:
            try:
                torch.set_num_interop_threads(interop)
            except RuntimeError:
                pass  # inter-op work already ran in this process: the read-back below says what holds
        for name in _SWITCHES:
            os.environ[SETTING_ENV_VARS[name]] = "1" if getattr(self, name) else "0"
        os.environ[SETTING_ENV_VARS["prefill_segment"]] = str(self.prefill_segment)
        return self.in_force()

    def in_force(self) -> dict[str, Any]:
        """The settings as this process runs them now (thread counts read back from torch)."""
        import torch

        return {**self.to_dict(), "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads()}


def settings_from_mapping(values: Mapping[str, Any], where: str) -> RuntimeSettings:
    """RuntimeSettings from a table (best.json `runtime`, a config file's `[runtime]`); unknown keys refused."""
    unknown = sorted(set(values) - set(RuntimeSettings.field_names()) - {"compile"})
    if unknown:
        raise UserError(f"{where}: unknown runtime setting(s) {unknown}; known are "
                        f"{['compile', *RuntimeSettings.field_names()]}")
    try:
        return RuntimeSettings(**{k: v for k, v in values.items() if k != "compile"})
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def resolve_runtime(
    *,
    cli: Mapping[str, Any] | None = None,
    best: Mapping[str, Any] | None = None,
    best_path: str | Path | None = None,
    context_len: int | None = None,
    environ: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[Any, RuntimeSettings]:
    """(RuntimeOptions, RuntimeSettings) from every source: CLI > best.json > environment > config > default.

    `cli` and `config` are flat tables of knobs and settings (`compile` is a RuntimeOptions field).
    `best` is a validated best.json document (its `runtime` table and the knobs for `context_len`).
    """
    from xlstm_tune.runtime.best_file import context_entry
    from xlstm_tune.runtime.options import RuntimeOptions

    option_names = set(RuntimeOptions.field_names())
    setting_names = set(RuntimeSettings.field_names())
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config:
        layers.append(("config file", config))
    layers.append(("environment", {**RuntimeOptions.env_overrides(environ), **RuntimeSettings.env_overrides(environ)}))
    if best is not None:
        layers.append((f"best.json {best_path or ''}".strip(),
                       {**dict(best.get("runtime") or {}), **context_entry(best, context_len)["knobs"]}))
    if cli:
        layers.append(("command line", {k: v for k, v in cli.items() if v is not None}))
    opts, settings = RuntimeOptions(), RuntimeSettings()
    for where, values in layers:
        unknown = sorted(set(values) - option_names - setting_names)
        if unknown:
            raise UserError(f"{where}: unknown runtime option(s) {unknown}; known are "
                            f"{sorted(option_names | setting_names)}")
        try:
            opts = opts.replace(**{k: v for k, v in values.items() if k in option_names})
            settings = settings.replace(**{k: v for k, v in values.items() if k in setting_names})
        except UserError as exc:
            raise UserError(f"bad {where} setting: {exc}") from None
    return opts, settings
