"""How many trials each sampler needs to find a near-optimal configuration, against random search.

    python benchmarks/sampler_efficiency.py                 # replay the recorded grid (seconds to minutes)
    python benchmarks/sampler_efficiency.py --record        # re-measure the grid first (~3 min on 2 CPU cores)
    python benchmarks/sampler_efficiency.py --seeds 20 --samplers tpe,random --target 0.9 --json

The ground truth is a recorded exhaustive grid (`experiments/grid_tiny.toml`: every valid configuration of
the `tiny` model on a CPU, measured once), kept in benchmarks/data/tiny_cpu_grid/. Each sampler then runs
replayed studies (`xlstm_tune.study.replay`: trials answered from the record, deterministic per seed) and we
count the trials until one reaches `target` (default 95%) of the exhaustive optimum of the objective.

Two costs are reported: trials (what --n-trials counts) and distinct configurations (what a real study
measures; a repeated configuration is answered from its first measurement). Runs that never reach the
target within `--budget` trials are counted as failures and shown apart (they are not in the quantiles).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "data" / "tiny_cpu_grid"
GRID_SPEC = REPO / "experiments" / "grid_tiny.toml"
SAMPLERS = ["random", "tpe", "ga", "gp", "grid", "cmaes"]


def record(data: Path) -> None:
    """Measure the whole grid with the real model and keep trials.jsonl + run_meta.json in `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "xlstm_tune", "study", "--experiment", str(GRID_SPEC), "--out-dir", tmp,
               "--no-progress"]
        print("recording:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=REPO)
        src = Path(tmp) / "studies" / "grid-tiny"
        data.mkdir(parents=True, exist_ok=True)
        for name in ("trials.jsonl", "run_meta.json"):
            shutil.copyfile(src / name, data / name)


def quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> int:
    from xlstm_tune.study.replay import (
        exhaustive_optimum,
        load_source,
        replay_trace_detailed,
        source_capabilities,
        source_model_info,
        source_spec_doc,
    )
    from xlstm_tune.study.space import SearchSpace
    from xlstm_tune.study.spec import parse_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="recorded study directory (trials.jsonl + run_meta.json)")
    p.add_argument("--record", action="store_true", help="measure the grid again before replaying")
    p.add_argument("--seeds", type=int, default=10, help="seeds per sampler (default 10)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated samplers")
    p.add_argument("--objective", default="prefill_tok_s", help="objective to maximise (default prefill_tok_s)")
    p.add_argument("--target", type=float, default=0.95, help="fraction of the exhaustive optimum to reach")
    p.add_argument("--budget", type=int, default=None, help="trials per run at most (default: 2 x grid points)")
    p.add_argument("--study-trials", type=int, default=20,
                   help="the study size samplers are configured for (their random start-up phase scales with it; "
                        "default 20, a typical --n-trials)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)

    if args.record or not (args.data / "trials.jsonl").is_file():
        record(args.data)
    src = load_source(str(args.data), args.data.parent)
    spec = parse_spec(source_spec_doc(src), f"recorded grid {args.data}")  # type: ignore[arg-type]
    space = SearchSpace.resolve(spec, source_model_info(src), source_capabilities(src))
    optimum, best_key = exhaustive_optimum(src.lookup, space, args.objective)
    target = args.target * optimum
    n_configs = space.size_valid()
    n_grid = 1
    for d in space.dims.values():
        n_grid *= len(d.values())
    good = sum(1 for r in src.lookup.values() if (r.get(args.objective) or 0) >= target
               and r.get("fidelity_passed", True))
    budget = args.budget or 2 * n_grid
    print(f"recorded grid: {len(src.lookup)} measured configurations ({n_configs} valid, {n_grid} grid points); "
          f"optimum {args.objective} = {optimum:,.0f} ({best_key}); target {args.target:.0%} = {target:,.0f}, "
          f"reached by {good} configuration(s); {args.seeds} seeds per sampler, budget {budget} trials, "
          f"samplers configured for {args.study_trials}-trial studies")

    results = {}
    for name in [s.strip() for s in args.samplers.split(",") if s.strip()]:
        if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
            print(f"  {name}: skipped (pip install cmaes)")
            continue
        t0 = time.perf_counter()
        trials, configs, failures = [], [], 0
        for seed in range(args.seeds):
            trace = replay_trace_detailed(src.lookup, space, name, seed, budget, args.objective, stop_at=target,
                                          sampler_trials=args.study_trials)
            hit = next((i for i, (v, _) in enumerate(trace, start=1) if v is not None and v >= target), None)
            if hit is None:
                failures += 1
                continue
            trials.append(hit)
            configs.append(sum(1 for _, new in trace[:hit] if new))
        results[name] = {"trials": trials, "configs": configs, "failures": failures,
                         "seconds": time.perf_counter() - t0}

    base = results.get("random")
    header = ["sampler", "trials median", "p20", "p80", "configs median", "p20", "p80", "not reached",
              "vs random", "wall s"]
    rows = []
    for name, r in results.items():
        t, c = r["trials"], r["configs"]
        med = statistics.median(t) if t else float("nan")
        ratio = (statistics.median(base["trials"]) / med) if (base and base["trials"] and t) else float("nan")
        rows.append([name,
                     f"{med:.1f}", f"{quantile(t, .2):.1f}" if t else "-", f"{quantile(t, .8):.1f}" if t else "-",
                     f"{statistics.median(c):.1f}" if c else "-", f"{quantile(c, .2):.1f}" if c else "-",
                     f"{quantile(c, .8):.1f}" if c else "-",
                     f"{r['failures']}/{args.seeds}", f"{ratio:.2f}x" if ratio == ratio else "-", f"{r['seconds']:.1f}"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
    print(f"\ntrials: to reach {args.target:.0%} of the optimum (what --n-trials counts); configs: distinct "
          f"configurations among them (what a study measures); vs random: random's median trials / this median.")
    if args.json:
        print(json.dumps({"optimum": optimum, "target": target, "budget": budget, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
