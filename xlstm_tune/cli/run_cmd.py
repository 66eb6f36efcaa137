"""`python -m xlstm_tune run`: generate text with given knobs, a config file or a best.json, printing tok/s.

    python -m xlstm_tune run --best mlruns/studies/quickstart/best.json --prompt "Hello" --new-tokens 64

Knobs and settings: flags > --best best.json > XLSTM_* environment > --config file > built-in defaults;
a best.json measured on another model or device is refused unless --allow-mismatch. Prints what it
applied (and which best.json entry), prefill and decode tok/s, and the text.
`--stats-log` writes one CSV row per decode step (`step,dt_ms,cum_ms,inst_tok_s,avg_tok_s`), flushed
line by line, so Ctrl-C keeps everything written so far.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from xlstm_tune.cli import common
from xlstm_tune.errors import UserError

DEFAULT_PROMPT = "The xLSTM architecture keeps a matrix memory per head, so"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="generate text with given knobs or a best.json, printing tok/s",
                       description=__doc__.splitlines()[0])
    common.add_model_flags(p)
    common.add_prompt_flags(p, new_tokens_aliases=("--max-new-tokens",), lengths=False, repeats=False)
    common.add_knob_flags(p, multi=False, best=True)
    common.add_runtime_flags(p, best=True)
    p.add_argument("--context-len", type=int, default=None, metavar="N",
                   help="pick best.json's entry for this context length (default: the prompt's length)")
    p.add_argument("--stats-log", type=Path, default=None, metavar="PATH",
                   help="CSV of per-step decode timing (step,dt_ms,cum_ms,inst_tok_s,avg_tok_s)")
    m = p.add_argument_group("memory watchdog (override XLSTM_MEM_* variables)")
    m.add_argument("--mem-log", type=Path, default=None, metavar="PATH", help="CSV log of memory polls")
    m.add_argument("--mem-every", type=int, default=None, metavar="MS", help="poll interval in ms (XLSTM_MEM_POLL_MS)")
    m.add_argument("--mem-soft-pct", type=float, default=None, metavar="PCT",
                   help="soft limit: %% of device memory in use that triggers --mem-action (XLSTM_MEM_SOFT_PCT)")
    m.add_argument("--mem-hard-pct", type=float, default=None, metavar="PCT",
                   help="hard limit: %% of device memory in use that aborts the run (XLSTM_MEM_HARD_PCT)")
    m.add_argument("--mem-soft-mb", type=float, default=None, metavar="MB",
                   help="soft limit in MB in use that triggers --mem-action (XLSTM_MEM_SOFT_MB)")
    m.add_argument("--mem-hard-mb", type=float, default=None, metavar="MB",
                   help="hard limit in MB in use that aborts the run (XLSTM_MEM_HARD_MB)")
    m.add_argument("--mem-action", default=None, metavar="ACTIONS",
                   help="what the soft limit does, comma-separated: warn, empty_cache (XLSTM_MEM_ACTION)")
    p.set_defaults(func=run)


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror}") from None
    return args.prompt if args.prompt is not None else DEFAULT_PROMPT


def _watchdog_config(args: argparse.Namespace) -> Any:
    from xlstm_tune.runtime.watchdog import WatchdogConfig

    overrides = {name: value for name, value in {
        "soft_pct": args.mem_soft_pct, "hard_pct": args.mem_hard_pct, "soft_mb": args.mem_soft_mb,
        "hard_mb": args.mem_hard_mb, "poll_ms": args.mem_every, "actions": args.mem_action, "log_path": args.mem_log,
    }.items() if value is not None}
    return WatchdogConfig.from_env(**overrides)


class StatsLog:
    """Per-step decode CSV, one flushed line per step."""

    HEADER = "step,dt_ms,cum_ms,inst_tok_s,avg_tok_s\n"

    def __init__(self, path: Path, batch: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: TextIO = path.open("w", encoding="utf-8")
        self.fh.write(self.HEADER)
        self.fh.flush()
        self.batch, self.cum = batch, 0.0

    def __call__(self, step: int, dt: float) -> None:
        self.cum += dt
        inst = self.batch / dt if dt > 0 else float("inf")
        avg = self.batch * step / self.cum if self.cum > 0 else float("inf")
        self.fh.write(f"{step},{dt * 1e3:.4f},{self.cum * 1e3:.4f},{inst:.3f},{avg:.3f}\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def run(args: argparse.Namespace) -> int:
    args.new_tokens = 64 if args.new_tokens is None else args.new_tokens
    if args.new_tokens < 1:
        raise UserError(f"--new-tokens/--max-new-tokens must be >= 1, got {args.new_tokens}")
    if args.context_len is not None and args.context_len < 1:
        raise UserError(f"--context-len must be >= 1, got {args.context_len}")
    from xlstm_tune.bench.workload import describe_model

    prompt = _prompt(args)
    model_name = args.model or "tiny"
    info = describe_model(model_name)
    wd_config = _watchdog_config(args)

    import torch

    from xlstm_tune.model.loading import load_model
    from xlstm_tune.runtime import device as dev
    from xlstm_tune.runtime.best_file import context_entry
    from xlstm_tune.runtime.watchdog import MemoryWatchdog

    # Validate flags, --config, --best (and its target) before loading anything heavy.
    device = dev.resolve_device(args.device or "auto")
    best = common.read_best_flag(args, model_info=info, device=device)
    first_options, settings = common.runtime_from_args(args, best=best, context_len=args.context_len,
                                                       num_heads=info["num_heads"])
    in_force = settings.apply(device)
    model = load_model(model_name, device=str(device), dtype=settings.dtype, runtime=first_options)
    ids = model.encode(prompt)
    context = args.context_len or ids.shape[1]
    options, _ = common.runtime_from_args(args, best=best, context_len=context, num_heads=model.config.num_heads)
    model.runtime = options
    in_force["dtype"] = str(model.dtype).removeprefix("torch.")
    if best is not None:
        entry = context_entry(best, context)
        source = f"best.json {args.best} (entry for context {entry['context_len']}; prompt {ids.shape[1]} tokens)"
    else:
        source = "flags/environment/config/defaults"
    print(f"model {model.model_id} on {dev.device_name(model.device)} ({model.device}, {str(model.dtype).removeprefix('torch.')})")
    print(f"applied from {source}: " + " ".join(f"{k}={v}" for k, v in {**options.to_dict(), **in_force}.items()))
    print("env form: " + " ".join(f"{k}={v}" for k, v in {**options.to_env(), **settings.to_env()}.items()))

    stats_log = StatsLog(args.stats_log, ids.shape[0]) if args.stats_log else None
    decode_times: list[float] = []

    def on_step(step: int, dt: float) -> None:
        decode_times.append(dt)
        if stats_log:
            stats_log(step, dt)

    tokens = None
    try:
        with MemoryWatchdog(wd_config, model.device):
            dev.synchronize(model.device)
            t0 = time.perf_counter()
            logits, state = model(ids)
            dev.synchronize(model.device)
            prefill_s = time.perf_counter() - t0
            first = logits[:, -1].argmax(-1, keepdim=True)
            tokens, state = model.generate(first, max_new_tokens=args.new_tokens, state=state, on_step=on_step)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(decode_times)} decode steps; logs kept", file=sys.stderr)
        return 130
    finally:
        if stats_log:
            stats_log.close()
        model.close()
    decode_s = sum(decode_times)
    stats = model.stats.as_dict()
    print(f"prefill: {ids.shape[1]} tokens in {prefill_s:.3f} s = {ids.shape[1] * ids.shape[0] / prefill_s:,.1f} tok/s"
          f"  (kernels: {dict(stats.get('kernel_paths', {}))}, compiled calls: {stats.get('compiled_calls', 0)}, "
          f"prefill: {dict(stats.get('prefill_paths', {}))}, piece lengths: {stats.get('prefill_lengths', [])})")
    if decode_times:
        print(f"decode: {len(decode_times)} steps in {decode_s:.3f} s = {len(decode_times) * ids.shape[0] / decode_s:,.1f} tok/s "
              f"[{options.decode_mode}]")
    print("---")
    print(prompt + model.decode(torch.cat([first, tokens], dim=1)[0]))
    if args.stats_log:
        print(f"--- decode stats: {args.stats_log}")
    return 0
