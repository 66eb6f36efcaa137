"""`python -m xlstm_tune run`: the local runner. Generate text with given knobs or a best.json.

Prints the options it applied (and where they came from), prefill and decode tok/s, and the text.
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
    p = sub.add_parser("run", help="generate text with given knobs or a best.json, printing tok/s")
    common.add_model_flags(p)
    common.add_prompt_flags(p, new_tokens_flag="--max-new-tokens", lengths=False, repeats=False)
    common.add_knob_flags(p, multi=False, best=True)
    p.add_argument("--context-len", type=int, default=None, help="pick best.json's entry for this context (default: prompt length)")
    p.add_argument("--stats-log", type=Path, default=None, help="CSV of per-step decode timing")
    m = p.add_argument_group("memory watchdog (override XLSTM_MEM_* variables)")
    m.add_argument("--mem-log", type=Path, default=None, help="CSV log of memory polls")
    m.add_argument("--mem-every", type=int, default=None, help="poll interval in ms (XLSTM_MEM_POLL_MS)")
    m.add_argument("--mem-soft-pct", type=float, default=None)
    m.add_argument("--mem-hard-pct", type=float, default=None)
    m.add_argument("--mem-soft-mb", type=float, default=None)
    m.add_argument("--mem-hard-mb", type=float, default=None)
    m.add_argument("--mem-action", default=None, help="soft actions: warn,empty_cache")
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
    args.max_new_tokens = 64 if args.max_new_tokens is None else args.max_new_tokens
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    from xlstm_tune.runtime.options import RuntimeOptions

    prompt = _prompt(args)
    # Validate the knobs, best.json and the watchdog settings before loading anything heavy.
    common.runtime_options(args)
    wd_config = _watchdog_config(args)

    import torch

    from xlstm_tune.model.loading import load_model
    from xlstm_tune.runtime import device as dev
    from xlstm_tune.runtime.watchdog import MemoryWatchdog

    model = load_model(args.model or "tiny", device=args.device or "auto", dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", compile=False))
    ids = model.encode(prompt)
    context = args.context_len or ids.shape[1]
    options = common.runtime_options(args, context_len=context, num_heads=model.config.num_heads)
    model.runtime = options
    source = f"best.json {args.best} (context {context})" if args.best else "flags/environment/defaults"
    print(f"model {model.model_id} on {dev.device_name(model.device)} ({model.device}, {str(model.dtype).removeprefix('torch.')})")
    print(f"applied from {source}: " + " ".join(f"{k}={v}" for k, v in options.to_dict().items()))
    print("env form: " + " ".join(f"{k}={v}" for k, v in options.to_env().items()))

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
            tokens, state = model.generate(first, max_new_tokens=args.max_new_tokens, state=state, on_step=on_step)
    except KeyboardInterrupt:
        print(f"\ninterrupted after {len(decode_times)} decode steps; logs kept", file=sys.stderr)
        return 130
    finally:
        if stats_log:
            stats_log.close()
        model.close()
    decode_s = sum(decode_times)
    print(f"prefill: {ids.shape[1]} tokens in {prefill_s:.3f} s = {ids.shape[1] * ids.shape[0] / prefill_s:,.1f} tok/s"
          f"  (kernels: {dict(model.stats.kernel_paths)})")
    if decode_times:
        print(f"decode: {len(decode_times)} steps in {decode_s:.3f} s = {len(decode_times) * ids.shape[0] / decode_s:,.1f} tok/s "
              f"[{options.decode_mode}]")
    print("---")
    print(prompt + model.decode(torch.cat([first, tokens], dim=1)[0]))
    if args.stats_log:
        print(f"--- decode stats: {args.stats_log}")
    return 0
