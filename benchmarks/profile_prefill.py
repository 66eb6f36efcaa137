"""Where a prefill's time goes: the device kernels of one prompt, grouped, with their share of the time.

    python benchmarks/profile_prefill.py --model xlstm-7b --length 8192          # CUDA, bf16
    python benchmarks/profile_prefill.py --model xlstm-350m --length 8192 --processes 4   # between processes
    python benchmarks/profile_prefill.py --model xlstm-20m --length 1024 --device cpu --dtype float32

Runs our `native` backend (compiled unless --no-compile, chunk size from --chunk-size) once to warm up,
times --repeats prefills (median, CV), then runs once under torch.profiler and prints the top kernels by
device time, a grouping into matrix products (projections, FFN, head), the mLSTM cell and the rest, and how
much of the wall time the device was busy: far below 100%, the prefill waits on the host (launches,
Python), not on the kernels.

With --processes N the same measurement runs in N fresh processes, one after another, and prints each
process's figures and the kernels whose time moves most between them: what to look at when the same tree
prefills at different speeds in different processes (docs/PERFORMANCE.md, 2026-12-03). With --base TREE
(a checkout or `git archive` of another commit) N processes of each tree alternate, and the table adds each
tree's median and their ratio: a prefill A/B in which both trees see the same machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GEMM_MARKERS = ("gemm", "sm90_xmma", "cutlass", "ampere_", "sm80_", "nvjet", "gemv", "addmm", "mm_")


def group_of(name: str) -> str:
    low = name.lower()
    if any(m in low for m in GEMM_MARKERS):
        return "matrix products (GEMM)"
    if "triton" in low or "fused" in low:
        return "generated elementwise / reductions (cell and norms)"
    return "other (copies, cat, framework kernels)"


def measure(args: argparse.Namespace) -> dict:
    """One process's prefill: timed repeats, then one profiled run, as plain numbers."""
    if args.tree:  # the other tree of an A/B: its package first (nothing of it is imported before here)
        sys.path.insert(0, str(Path(args.tree).resolve()))
    import xlstm_tune
    from xlstm_tune import RuntimeOptions, load_model

    gpu = args.device.startswith("cuda")
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=args.chunk_size, compile=args.compile))
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=args.device)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    t0 = time.perf_counter()
    model(ids)  # compile and warm up
    sync()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model(ids)
        sync()
        times.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        model(ids)
        sync()
        profiled_s = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if (e.device_time_total if gpu else e.self_cpu_time_total) > 0]
    if gpu:  # device kernels only (CPU-side operator rows would double count)
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    key = (lambda e: e.device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    kernels: dict[str, float] = {}
    calls: dict[str, int] = {}
    for e in events:
        kernels[e.key] = kernels.get(e.key, 0.0) + key(e) / 1e3  # ms
        calls[e.key] = calls.get(e.key, 0) + e.count
    median = statistics.median(times)
    out = {
        "where": torch.cuda.get_device_name() if gpu else "cpu", "model": args.model, "dtype": args.dtype,
        "length": args.length, "cell_products": sorted(model.stats.cell_products), "first_s": first_s,
        "tok_s": args.length / median, "cv": statistics.pstdev(times) / statistics.mean(times),
        "profiled_ms": profiled_s * 1e3, "busy_ms": sum(kernels.values()), "launches": sum(calls.values()),
        "kernels": kernels, "calls": calls, "package": str(Path(xlstm_tune.__file__).resolve().parent),
    }
    model.close()
    return out


def print_profile(res: dict, top: int) -> None:
    print(f"{res['model']} {res['dtype']} prefill {res['length']} tokens on {res['where']}: "
          f"cell products {res['cell_products']}, {res['tok_s']:,.0f} tok/s (median of the repeats, CV "
          f"{res['cv']:.1%}); profiled run {res['profiled_ms']:.1f} ms, kernels {res['busy_ms']:.1f} ms "
          f"({res['busy_ms'] / res['profiled_ms']:.0%} of it), {res['launches']} kernel calls")
    kernels, calls, total = res["kernels"], res["calls"], res["busy_ms"]
    print("| kernel | calls | ms | share |\n|---|---|---|---|")
    for name in sorted(kernels, key=kernels.get, reverse=True)[:top]:
        print(f"| {name[:90]} | {calls[name]} | {kernels[name]:.2f} | {kernels[name] / total:.1%} |")
    groups: dict[str, float] = {}
    for name, ms in kernels.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + ms
    print("| group | ms | share |\n|---|---|---|")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t:.1f} | {t / total:.1%} |")


def print_between(results: list[dict], top: int) -> None:
    """Each process's figures (and each tree's median), then the kernels whose time differs most."""
    print("| process | tree | tok/s | CV | first prefill s | profiled ms | kernels ms | busy | kernel calls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r['tree']} | {r['tok_s']:,.0f} | {r['cv']:.1%} | {r['first_s']:.1f} | {r['profiled_ms']:.1f} | "
              f"{r['busy_ms']:.1f} | {r['busy_ms'] / r['profiled_ms']:.0%} | {r['launches']} |")
    trees = sorted({r["tree"] for r in results}, key=lambda t: t != "this")
    medians = {t: statistics.median(r["tok_s"] for r in results if r["tree"] == t) for t in trees}
    packages = {t: sorted({r["package"] for r in results if r["tree"] == t}) for t in trees}
    print("\npackages: " + "; ".join(f"{t} {', '.join(p)}" for t, p in packages.items()))
    print("; ".join(f"{t}: median {m:,.0f} tok/s" for t, m in medians.items())
          + (f"; this / base {medians['this'] / medians['base']:.3f}x" if len(trees) == 2 else ""))
    names = set().union(*(r["kernels"] for r in results))
    spread = {n: [r["kernels"].get(n, 0.0) for r in results] for n in names}
    moving = sorted(names, key=lambda n: max(spread[n]) - min(spread[n]), reverse=True)[:top]
    print(f"\nkernels whose time moves most between the {len(results)} processes (ms per prefill):")
    print("| kernel | " + " | ".join(f"p{i}" for i in range(1, len(results) + 1)) + " | max - min |")
    print("|---|" + "---|" * len(results) + "---|")
    for n in moving:
        v = spread[n]
        print(f"| {n[:80]} | " + " | ".join(f"{x:.2f}" for x in v) + f" | {max(v) - min(v):.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="run the prefill kernels eagerly")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills before the profiled one")
    ap.add_argument("--processes", type=int, default=1, help="measure in this many fresh processes, in turn")
    ap.add_argument("--base", type=Path, default=None, help="another tree: its processes alternate with this one's")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one process: JSON on stdout
    ap.add_argument("--tree", default=None, help=argparse.SUPPRESS)  # the worker's package tree (--base)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.processes < 1:
        print("profile_prefill.py: --repeats and --processes must be at least 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"profile_prefill.py: --device {args.device} needs CUDA, which is not available here: "
              "use --device cpu", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    if args.base is not None and not (args.base / "xlstm_tune" / "__init__.py").is_file():
        print(f"profile_prefill.py: --base {args.base} holds no xlstm_tune package: give a checkout or "
              "`git archive <commit> xlstm_tune | tar -x -C DIR` of the baseline", file=sys.stderr)
        return 2
    if args.processes == 1 and args.base is None:
        print_profile(measure(args), args.top)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    trees = [("this", None)] + ([("base", str(args.base))] if args.base is not None else [])
    results = []
    for i in range(args.processes):
        for label, tree in trees:
            cmd = [sys.executable, __file__, *argv, "--worker"] + (["--tree", tree] if tree else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
                print(f"profile_prefill.py: process {len(results) + 1} ({label}) failed (exit {proc.returncode}): "
                      f"{tail}", file=sys.stderr)
                return 1
            results.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "tree": label})
    print_profile(results[0], args.top)
    print()
    print_between(results, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
