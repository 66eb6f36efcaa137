"""CPU workers side by side: torch's default thread count in every worker against cores // N (study --devices cpu:N).

    python benchmarks/fleet_threads.py [--workers 2] [--seconds 10] [--size 384]

Starts N worker processes at once, each running float32 matmuls (the bulk of a CPU prefill) for a fixed
time, once with torch's default intra-op threads in each (every worker uses every core) and once with
`cores // N` threads each (what `study --devices cpu:N` sets), and prints per-worker and total
throughput with the per-worker spread. A single worker with all cores is the baseline of the same run.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time


def _worker(threads: int | None, size: int, seconds: float, start, out) -> None:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    start.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    out.put(2 * size**3 * n / (time.perf_counter() - t0) / 1e9)  # GFLOP/s


def run(workers: int, threads: int | None, size: int, seconds: float) -> list[float]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(threads, size, seconds, start, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=384)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows = [("1 worker, all cores", run(1, None, a.size, a.seconds)),
            (f"{a.workers} workers, default threads", run(a.workers, None, a.size, a.seconds)),
            (f"{a.workers} workers, {max(1, cores // a.workers)} thread(s) each", run(a.workers, max(1, cores // a.workers),
                                                                                  a.size, a.seconds))]
    print(f"{cores} cores, {a.size}x{a.size} float32 matmul, {a.seconds:g} s per worker")
    print(f"{'setting':<34} {'total GFLOP/s':>13} {'per worker':>11} {'spread':>7}")
    for name, rates in rows:
        spread = (max(rates) - min(rates)) / statistics.mean(rates) if len(rates) > 1 else 0.0
        print(f"{name:<34} {sum(rates):>13.1f} {statistics.mean(rates):>11.1f} {spread:>6.0%}")


if __name__ == "__main__":
    main()
