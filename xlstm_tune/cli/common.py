"""Flags shared by the subcommands (docs/DESIGN.md §4 "Command line"), defined once.

    add_model_flags(p)                          --model --device --dtype
    add_prompt_flags(p)                         --prompt --prompt-file --prefill-len --new-tokens --repeats
    add_knob_flags(p, multi=False, best=True)   --backend (--chunkwise-backend) --chunk-size --heads-per-band --workers
                                                --t-inner --streams --decode-mode --compile/--no-compile [--best]
    add_runtime_flags(p, best=True)             --config --threads --interop-threads --tf32-cell --fused-decode
                                                --triton-gemv --decode-pdl --prefill-graph [--allow-mismatch]

and the readers that turn parsed flags into objects: `knob_overrides`, `runtime_from_args` (precedence
CLI flag > best.json > environment > config file > built-in default, and best.json's target checked),
`prompt_source`, `prefill_lengths`.
Every default is None ("not given"), so a reader can tell a flag the user typed from a default and a spec
or best.json can fill the rest. With `multi=True` (the study command) a knob flag takes a comma-separated
list of values: one value fixes the knob, several make it the searched choices.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from xlstm_tune.errors import UserError

KNOB_FLAGS = {
    # knob: (flags, metavar, help)
    "backend": (("--backend", "--chunkwise-backend"), "NAME",
                "prefill scheduler: native, queued or ray (seed names like queued_compiled_steps accepted)"),
    "chunk_size": (("--chunk-size",), "N", "tokens per chunk"),
    "heads_per_band": (("--heads-per-band",), "N", "heads per scheduled task (band)"),
    "workers": (("--workers",), "N", "coordinator threads of the queued backend"),
    "t_inner": (("--t-inner",), "N", "timesteps per step-block call; must divide --chunk-size"),
    "streams": (("--streams",), "N", "device streams for the queued backend (0: none)"),
    "decode_mode": (("--decode-mode",), "MODE", "decode step: eager, compiled or graph"),
}
_INT_KNOBS = ("chunk_size", "heads_per_band", "workers", "t_inner", "streams")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME|DIR",
                   help="preset (tiny, xlstm-20m, xlstm-350m, xlstm-7b) or a Hugging Face checkpoint directory")
    g.add_argument("--device", default=None, metavar="DEV", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default=None, metavar="DTYPE", help="weight dtype: float32 (default), bfloat16 or float16")


def add_prompt_flags(parser: argparse.ArgumentParser, *, new_tokens_aliases: tuple[str, ...] = (),
                     lengths: bool = True, repeats: bool = True) -> None:
    g = parser.add_argument_group("workload")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, metavar="TEXT", help="prompt text")
    src.add_argument("--prompt-file", default=None, metavar="PATH", help="read the prompt from a UTF-8 text file")
    if lengths:
        g.add_argument("--prefill-len", default=None, metavar="N[,N...]",
                       help="prompt lengths in tokens, e.g. 512,2048,8192 (synthetic ids, or the prompt repeated/cut)")
    g.add_argument("--new-tokens", *new_tokens_aliases, dest="new_tokens", type=int, default=None, metavar="N", help="tokens to decode")
    if repeats:
        g.add_argument("--repeats", type=int, default=None, metavar="N", help="timed repetitions per measurement")


def add_knob_flags(parser: argparse.ArgumentParser, *, multi: bool = False, best: bool = True) -> None:
    g = parser.add_argument_group("runtime knobs" + (" (comma-separated values: one fixes the knob, several are searched)"
                                                      if multi else ""))
    for knob, (flags, metavar, help_) in KNOB_FLAGS.items():
        g.add_argument(*flags, dest=knob, default=None, metavar=metavar + ("[,...]" if multi else ""), help=help_)
    g.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the prefill kernels (--no-compile runs them eagerly)")
    if best:
        g.add_argument("--best", default=None, metavar="PATH",
                       help="apply the knobs of a best.json written by `study`/`export` (flags still win)")


def _one(knob: str, text: Any) -> Any:
    from xlstm_tune.study.spec import normalize_knob_value

    return normalize_knob_value(knob, text, f"--{knob.replace('_', '-')}")


def knob_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Single knob values given on the command line (knob -> value), validated."""
    out: dict[str, Any] = {}
    for knob in KNOB_FLAGS:
        value = getattr(args, knob, None)
        if value is None:
            continue
        if isinstance(value, str) and "," in value:
            raise UserError(f"--{knob.replace('_', '-')} takes one value here, got {value!r}")
        out[knob] = _one(knob, value)
    return out


def knob_lists(args: argparse.Namespace) -> dict[str, list[Any]]:
    """Comma-separated knob values (the study command): knob -> list of values."""
    out: dict[str, list[Any]] = {}
    for knob in KNOB_FLAGS:
        value = getattr(args, knob, None)
        if value is None:
            continue
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            raise UserError(f"--{knob.replace('_', '-')} is empty: give one or more values")
        out[knob] = [_one(knob, p) for p in parts]
    return out


# Process-wide settings: flag -> (setting, help). Switches take --X / --no-X.
_SWITCH_FLAGS = {
    "tf32_cell": "TF32 float32 cell products of bf16/fp16 models on CUDA (XLSTM_TF32_CELL)",
    "fused_decode": "fused batch-1 decode kernels on CUDA (XLSTM_FUSED_DECODE)",
    "triton_gemv": "Triton batch-1 GEMV on CUDA (XLSTM_TRITON_GEMV)",
    "decode_pdl": "dependent launch of the fused decode kernels on Hopper+ CUDA (XLSTM_DECODE_PDL)",
    "prefill_graph": "native prefill replayed from a device graph per prompt shape, CUDA (XLSTM_PREFILL_GRAPH)",
}


def add_runtime_flags(parser: argparse.ArgumentParser, *, best: bool = True) -> None:
    g = parser.add_argument_group("runtime settings (process-wide; defaults suit the device)")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="runtime configuration file, e.g. configs/cuda.toml (below flags, best.json and XLSTM_* "
                        "variables)" + ("" if best else "; a study applies its settings and measures its knobs first"))
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads (default: CPU physical cores; CUDA/MPS 4)")
    g.add_argument("--interop-threads", type=int, default=None, metavar="N", help="torch inter-op threads (default 1)")
    g.add_argument("--prefill-segment", type=int, default=None, metavar="N",
                   help="feed prompts in pieces of at most N tokens (full segments, then powers of two), so few "
                        "prompt shapes are compiled or captured (XLSTM_PREFILL_SEGMENT; 0: whole, the default)")
    for name, help_ in _SWITCH_FLAGS.items():
        g.add_argument(f"--{name.replace('_', '-')}", dest=name, action=argparse.BooleanOptionalAction, default=None,
                       help=help_)
    if best:
        g.add_argument("--allow-mismatch", action="store_true",
                       help="apply a --best file measured on another model or device")


def runtime_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The process-wide settings given on the command line (setting -> value)."""
    names = ("threads", "interop_threads", "prefill_segment", *_SWITCH_FLAGS)
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def config_table(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's knobs and settings as one table (empty without --config)."""
    from xlstm_tune.runtime.config_file import load_config

    path = getattr(args, "config", None)
    return load_config(path).flat() if path is not None else {}


def read_best_flag(args: argparse.Namespace, *, model_info: Mapping[str, Any], device: Any) -> dict[str, Any] | None:
    """The --best file, validated and checked against the target model and device (UserError if not for them)."""
    path = getattr(args, "best", None)
    if path is None:
        return None
    from xlstm_tune.runtime.best_file import check_target, read_best
    from xlstm_tune.runtime.device import device_name

    best = read_best(path)
    found = check_target(best, path, allow_mismatch=bool(getattr(args, "allow_mismatch", False)),
                         model_id=model_info.get("model_id"), config_hash=model_info.get("config_hash"),
                         device_name=device_name(device))
    for what in found:
        sys.stderr.write(f"warning: --allow-mismatch: {path} was measured on {what}\n")
    return best


def runtime_from_args(args: argparse.Namespace, *, best: Mapping[str, Any] | None, context_len: int | None = None,
                      environ: Mapping[str, str] | None = None, num_heads: int | None = None) -> tuple[Any, Any]:
    """(RuntimeOptions, RuntimeSettings): flags > --best > environment > --config > built-in defaults.

    With `num_heads`, a heads_per_band that nobody set is clamped to the model (the built-in default is 4).
    """
    from xlstm_tune.runtime.settings import resolve_runtime

    cli: dict[str, Any] = {**knob_overrides(args), **runtime_flags(args)}
    if getattr(args, "compile", None) is not None:
        cli["compile"] = bool(args.compile)
    if getattr(args, "dtype", None) is not None:
        cli["dtype"] = args.dtype
    config = config_table(args)
    opts, settings = resolve_runtime(cli=cli, best=best, best_path=getattr(args, "best", None),
                                     context_len=context_len, environ=environ, config=config)
    if num_heads is not None and opts.heads_per_band > num_heads:
        from xlstm_tune.runtime.options import RuntimeOptions

        explicit = ("heads_per_band" in cli or "heads_per_band" in config or best is not None
                    or RuntimeOptions.env_overrides(environ).get("heads_per_band") is not None)
        if opts.backend == "native" or not explicit:
            opts = opts.replace(heads_per_band=num_heads)
    return opts, settings


def prompt_source(args: argparse.Namespace, seed: int = 0) -> Any:
    from xlstm_tune.bench.workload import PromptSource

    return PromptSource.from_args(getattr(args, "prompt", None), getattr(args, "prompt_file", None), seed=seed)


def prefill_lengths(args: argparse.Namespace) -> list[int]:
    from xlstm_tune.bench.workload import parse_lengths

    return parse_lengths(getattr(args, "prefill_len", None), "--prefill-len")


def positive(flag: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{flag} must be > 0, got {value}")
