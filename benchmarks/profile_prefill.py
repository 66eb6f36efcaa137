"""Where a prefill's time goes: the device kernels of one prompt, grouped, with their share of the time.

    python benchmarks/profile_prefill.py --model xlstm-7b --length 8192          # CUDA, bf16
    python benchmarks/profile_prefill.py --model xlstm-20m --length 1024 --device cpu --dtype float32

Runs our `native` backend (compiled, chunk size from --chunk-size) once to warm up and once under
torch.profiler, then prints the top kernels by device time and a grouping into matrix products
(projections, FFN, head), the mLSTM cell, and the rest, against the prefill's wall time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlstm_tune import RuntimeOptions, load_model  # noqa: E402

GEMM_MARKERS = ("gemm", "sm90_xmma", "cutlass", "ampere_", "sm80_", "nvjet", "gemv", "addmm", "mm_")


def group_of(name: str) -> str:
    low = name.lower()
    if any(m in low for m in GEMM_MARKERS):
        return "matrix products (GEMM)"
    if "triton" in low or "fused" in low:
        return "generated elementwise / reductions (cell and norms)"
    return "other (copies, cat, framework kernels)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="xlstm-7b")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=args.chunk_size, compile=True))
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), device=args.device)
    model(ids)  # compile and warm up
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        model(ids)
        sync()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if (e.device_time_total if gpu else e.self_cpu_time_total) > 0]
    key = (lambda e: e.device_time_total) if gpu else (lambda e: e.self_cpu_time_total)
    if gpu:  # device kernels only (CPU-side operator rows would double count)
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(key(e) for e in events) / 1e6
    print(f"{args.model} {args.dtype} prefill {args.length} tokens on {torch.cuda.get_device_name() if gpu else 'cpu'}: "
          f"cell products {sorted(model.stats.cell_products)}, "
          f"wall {wall * 1e3:.1f} ms ({args.length / wall:,.0f} tok/s), kernels {total * 1e3:.1f} ms")
    print("| kernel | calls | ms | share |\n|---|---|---|---|")
    for e in sorted(events, key=key, reverse=True)[:args.top]:
        print(f"| {e.key[:90]} | {e.count} | {key(e) / 1e3:.2f} | {key(e) / 1e6 / total:.1%} |")
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + key(e) / 1e6
    print("| group | ms | share |\n|---|---|---|")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {t * 1e3:.1f} | {t / total:.1%} |")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
