"""Do `backend` and `workers` move decode? Decode tok/s for decode_mode × backend × workers, one process.

    python benchmarks/decode_knobs.py                      # tiny (eager, compiled) + xlstm-20m (eager), ~3 min on 2 CPU cores
    python benchmarks/decode_knobs.py --models tiny --rounds 11 --new-tokens 128

One-token decode runs the decode mode's step function, never the prefill scheduler; the question is
whether the scheduler a backend leaves alive (the queued pool's threads, the Ray actors) slows it down.
Every configuration is measured the way a study leaves it: its runtime is set, a prompt is prefilled
through its backend (so the pool or the actors have just worked), then `--new-tokens` decode steps are
timed. Configurations are interleaved: each round measures all of them once, in an order rotated per
round, so slow drift of the machine's load hits all alike.

Per configuration: median decode tok/s with p20-p80 over the rounds, and the paired ratio to the
default configuration of the same model and decode mode (same round), with a 95% bootstrap interval
of its median. "default again" is the default measured as a second configuration: its interval shows
the noise floor of the paired ratio. A configuration moves decode beyond noise when its interval
excludes 1 and its median ratio lies outside the "default again" interval.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xlstm_tune import RuntimeOptions, load_model  # noqa: E402
from xlstm_tune.bench.stats import percentile  # noqa: E402
from xlstm_tune.model.presets import PRESETS  # noqa: E402
from xlstm_tune.runtime.decode import available_decode_modes  # noqa: E402
from xlstm_tune.study.space import DEFAULT_KNOBS  # noqa: E402

BOOTSTRAP = 4000


def configs(num_heads: int) -> list[tuple[str, dict]]:
    """(label, knobs) per decode mode: the default, the default again, and backend/workers moved."""
    default = dict(DEFAULT_KNOBS, heads_per_band=min(DEFAULT_KNOBS["heads_per_band"], num_heads))
    return [
        ("default", default),
        ("default again", default),
        ("queued hpb=1 workers=1", dict(default, heads_per_band=1, workers=1)),
        ("queued hpb=1 workers=4", dict(default, heads_per_band=1, workers=4)),
        ("native", dict(default, backend="native")),
        ("ray hpb=1", dict(default, backend="ray", heads_per_band=1)),
    ]


def decode_tok_s(model, prompt: torch.Tensor, knobs: dict, new_tokens: int) -> float:
    model.runtime = RuntimeOptions(compile=False, **knobs)
    _, state = model(prompt)  # prefill through this backend: its pool / actors have just run
    start = time.perf_counter()
    model.generate(prompt[:, -1:], new_tokens, state)  # new_tokens decode steps from the state
    return new_tokens / (time.perf_counter() - start)


def bootstrap_median(values: list[float], rng: random.Random) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median."""
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP))
    return percentile(meds, 2.5), percentile(meds, 97.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,xlstm-20m")
    ap.add_argument("--modes", default="eager,compiled", help="decode modes for tiny (larger models: eager only)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (pinned: less noise)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    print(f"# decode_knobs  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {args.threads}, "
          f"{args.rounds} rounds x {args.new_tokens} tokens after a {args.prompt_len}-token prefill")
    rows, verdicts, scale = [], [], []
    for name in args.models.split(","):
        if name not in PRESETS:
            print(f"# {name}: not a preset here, skipped")
            continue
        modes = [m for m in args.modes.split(",") if m in available_decode_modes(torch.device("cpu"))]
        if name != "tiny":
            modes = ["eager"]
        model = load_model(name, device="cpu", runtime=RuntimeOptions(backend="native", compile=False))
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len))
        grid = [(mode, label, dict(knobs, decode_mode=mode)) for mode in modes for label, knobs in configs(model.config.num_heads)]
        for _, _, knobs in grid:  # first call of every path (compiles, starts actors): not timed
            decode_tok_s(model, prompt, knobs, 2)
        samples: dict[int, list[float]] = {i: [] for i in range(len(grid))}
        for r in range(args.rounds):
            order = list(range(len(grid)))
            shift = r % len(order)
            for i in order[shift:] + order[:shift]:
                samples[i].append(decode_tok_s(model, prompt, grid[i][2], args.new_tokens))
        model.close()
        if {"eager", "compiled"} <= set(modes):  # a knob that does move decode, for scale
            eager = grid.index(next(g for g in grid if g[0] == "eager" and g[1] == "default"))
            comp = grid.index(next(g for g in grid if g[0] == "compiled" and g[1] == "default"))
            ratios = [a / b for a, b in zip(samples[comp], samples[eager])]
            lo, hi = bootstrap_median(ratios, rng)
            scale.append(f"{name}: decode_mode compiled vs eager (default knobs) {statistics.median(ratios):.3f}x, 95% CI {lo:.3f}-{hi:.3f}")
        for i, (mode, label, _) in enumerate(grid):
            base = grid.index(next(g for g in grid if g[0] == mode and g[1] == "default"))
            again = grid.index(next(g for g in grid if g[0] == mode and g[1] == "default again"))
            ratios = [a / b for a, b in zip(samples[i], samples[base])]
            floor = bootstrap_median([a / b for a, b in zip(samples[again], samples[base])], rng)
            lo, hi = bootstrap_median(ratios, rng) if i != base else (1.0, 1.0)
            med = statistics.median(ratios)
            s = sorted(samples[i])
            beyond = i != base and (lo > 1 or hi < 1) and not floor[0] <= med <= floor[1]
            rows.append((name, mode, label, statistics.median(s), percentile(s, 20), percentile(s, 80), med, lo, hi, beyond))
            if label not in ("default", "default again"):
                verdicts.append((name, mode, label, beyond, med))
    print(f"{'model':<10} {'mode':<9} {'configuration':<24} {'tok/s':>8} {'p20-p80':>17} {'vs default':>10} {'95% CI':>15}  beyond noise")
    for name, mode, label, med, p20, p80, ratio, lo, hi, beyond in rows:
        print(f"{name:<10} {mode:<9} {label:<24} {med:8.1f} {p20:8.1f}-{p80:<8.1f} {ratio:9.3f}x {lo:6.3f}-{hi:<6.3f}   "
              f"{'yes' if beyond else 'no'}")
    moved = [v for v in verdicts if v[3]]
    print()
    for line in scale:
        print(line)
    if moved:
        print("backend/workers move decode beyond noise in: " + "; ".join(f"{n} {m} {label} ({r:.3f}x)" for n, m, label, _, r in moved))
    else:
        print("backend/workers do not move decode beyond noise: every paired interval includes 1 or the A/A noise floor")
    from xlstm_tune.runtime.ray_scheduler import shutdown_private_runtime

    shutdown_private_runtime()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
