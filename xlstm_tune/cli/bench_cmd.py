"""`python -m xlstm_tune bench`: prefill and decode throughput of one configuration.

    python -m xlstm_tune bench --model tiny --prefill-len 512,2048 --new-tokens 32 --backend native --json

Knobs and settings: flags > --best best.json > XLSTM_* environment > --config file > built-in defaults
(a best.json measured on another model or device is refused unless --allow-mismatch). Prompts: --prompt,
--prompt-file, or synthetic ids of every --prefill-len (default 512). Figures follow docs/DESIGN.md §5: device
sync before every clock read, the first (compiling) call timed apart, warm-up, repeats, median with
p20/p80 and CV, re-measured while the CV is above --max-cv. Rows are named like llama-bench's:
`pp<N>` prefill of N tokens, `tg<N>` decode of N tokens (`tg<N> xB` for B sequences decoded together,
--batch-size B: tok/s counts B x N tokens).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xlstm_tune.cli.common import (
    add_knob_flags,
    add_model_flags,
    add_prompt_flags,
    add_runtime_flags,
    positive,
    prefill_lengths,
    prompt_source,
    read_best_flag,
    runtime_from_args,
)
from xlstm_tune.errors import UserError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="measure prefill and decode throughput of one configuration",
                              description=__doc__.splitlines()[0])
    add_model_flags(p)
    add_prompt_flags(p)
    add_knob_flags(p, multi=False, best=True)
    add_runtime_flags(p, best=True)
    g = p.add_argument_group("measuring")
    g.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="sequences decoded together (different prompts); decode tok/s counts B x tokens (default 1)")
    g.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed calls after the first (default 1)")
    g.add_argument("--max-cv", type=float, default=0.10, metavar="X",
                   help="re-measure while the coefficient of variation exceeds this (default 0.10)")
    g.add_argument("--max-rounds", type=int, default=3, metavar="N", help="measurement rounds at most (default 3)")
    g.add_argument("--busy-retries", type=int, default=1, metavar="N",
                   help="re-measure a figure taken on a busy machine up to N times, then flag it (default 1)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the synthetic prompt and the preset weights")
    g.add_argument("--decode-csv", default=None, metavar="PATH",
                   help="write per-step decode times (step,dt_ms,cum_ms,inst_tok_s,avg_tok_s)")
    g.add_argument("--json", action="store_true", help="print the full result as JSON on stdout")
    p.set_defaults(func=run)
    return p


def _row(name: str, tokens: int, s: Any, first: float, compile_s: float, flag: str) -> list[str]:
    return [name, str(tokens), f"{s.median:,.1f}", f"{s.p20:,.1f}", f"{s.p80:,.1f}", f"{s.cv * 100:.1f}%",
            str(s.n), f"{first:.3f}", f"{compile_s:.3f}", flag]


def _marks(result: Any) -> str:
    """The table's last column: `cv high` (noisy after every round), `busy` (taken on a busy machine)."""
    return ", ".join(m for m, on in (("cv high", result.cv_high), ("busy", result.busy)) if on)


def run(args: argparse.Namespace) -> int:
    from xlstm_tune import load_model
    from xlstm_tune.bench.harness import BenchSettings, run_benchmark, write_decode_csv
    from xlstm_tune.bench.workload import describe_model
    from xlstm_tune.runtime.device import device_summary, resolve_device

    for flag, value in (("--new-tokens", args.new_tokens), ("--repeats", args.repeats),
                        ("--max-rounds", args.max_rounds), ("--max-cv", args.max_cv), ("--batch-size", args.batch_size)):
        positive(flag, value)
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    if args.busy_retries < 0:
        raise UserError(f"--busy-retries must be >= 0, got {args.busy_retries}")
    model_name = args.model or "tiny"
    info = describe_model(model_name)
    lengths: list[int | None] = list(prefill_lengths(args))
    source = prompt_source(args, seed=args.seed)
    if not lengths:
        lengths = [None] if not source.synthetic else [512]
    device = resolve_device(args.device or "auto")
    best = read_best_flag(args, model_info=info, device=device)
    options, runtime = runtime_from_args(args, best=best, context_len=max((n for n in lengths if n), default=None),
                                         num_heads=info["num_heads"])
    in_force = runtime.apply(device)
    settings = BenchSettings(warmup=args.warmup, repeats=args.repeats or 5, max_cv=args.max_cv,
                             max_rounds=args.max_rounds, busy_retries=args.busy_retries)
    new_tokens = 32 if args.new_tokens is None else args.new_tokens
    model = load_model(model_name, device=str(device), dtype=runtime.dtype, runtime=options, seed=args.seed)
    try:
        report = run_benchmark(model, lengths, source, new_tokens, settings, model_info=info, batch_size=args.batch_size)
    finally:
        model.close()
    if args.decode_csv and report.decode is not None:
        write_decode_csv(args.decode_csv, report.decode.steps)
    dev = device_summary(model.device)
    if args.json:
        out = report.as_dict() | {"model": info, "device": dev, "dtype": str(model.dtype).removeprefix("torch."),
                                  "settings": settings.as_dict(), "runtime": in_force,
                                  "env": {**options.to_env(), **runtime.to_env()}}
        sys.stdout.write(json.dumps(out, indent=2, default=str) + "\n")
    else:
        k = options
        sys.stdout.write(f"{model_name} on {dev['device']} ({dev['device_name']}), {str(model.dtype).removeprefix('torch.')}, "
                         f"torch {dev['torch_version']}\n")
        sys.stdout.write(f"knobs: backend={k.backend} chunk_size={k.chunk_size} heads_per_band={k.heads_per_band} "
                         f"workers={k.workers} t_inner={k.t_inner} streams={k.streams} decode_mode={k.decode_mode} "
                         f"compile={k.compile}\n")
        sys.stdout.write("runtime: " + " ".join(f"{key}={value}" for key, value in in_force.items()) + "\n\n")
        rows = [_row(f"pp{p.context_len}", p.tokens, p.tok_s, p.first_call_s, p.compile_s, _marks(p))
                for p in report.prefill]
        if report.decode is not None:
            d = report.decode
            rows.append(_row(f"tg{d.new_tokens}" + (f" x{d.batch_size}" if d.batch_size > 1 else ""),
                             d.new_tokens * d.batch_size, d.tok_s, d.first_call_s, d.compile_s, _marks(d)))
        header = ["test", "tokens", "tok/s", "p20", "p80", "cv", "n", "first call s", "compile s", ""]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for line in [header, ["-" * w for w in widths], *rows]:
            sys.stdout.write("  ".join(c.rjust(w) if i and i < 9 else c.ljust(w)
                                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() + "\n")
        paths = sorted({path for p in report.prefill for path in p.stats.get("kernel_paths", {})})
        prefill_paths = sorted({p.path for p in report.prefill})
        pieces = sorted({n for p in report.prefill for n in p.stats.get("prefill_lengths", [])})
        cut = f" in pieces of {', '.join(map(str, pieces))} tokens" if len(pieces) > len(report.prefill) else ""
        sys.stdout.write(f"\nkernel paths: {', '.join(paths)}; prefill: {', '.join(prefill_paths)}{cut}\n")
    for flag in report.flags:
        sys.stderr.write(f"note: {flag}\n")
    return 0
