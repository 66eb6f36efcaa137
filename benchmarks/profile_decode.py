"""Where a decode token's time goes: the device kernels of graph decode, per token, against the wall time.

    python benchmarks/profile_decode.py --model xlstm-350m                 # CUDA, bf16, batch 1
    XLSTM_DECODE_PDL=0 python benchmarks/profile_decode.py --model xlstm-7b  # A/B: without dependent launch

Decodes --tokens greedy tokens in `graph` mode (the fused decode kernels where they apply) once to
capture and warm up, times --repeats more runs, then runs once under torch.profiler and prints every
device kernel's calls and microseconds per token. The difference between the wall time per token and
the kernels' busy time per token is the time the device spends between kernels (launch gaps, drains):
what fewer launches or dependent launch can recover; the busy time against weight bytes / copy
bandwidth is what the kernels themselves leave.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlstm_tune import RuntimeOptions, load_model  # noqa: E402


def copy_bandwidth_gb_s() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (time.perf_counter() - t0) / 1e9


def print_product_configs() -> None:
    """The tile each batch-1 product shape (N, K, prologue, epilogue) ran with: pinned (decode_tiles.json or
    in-process) or the autotuner's pick."""
    from xlstm_tune.kernels import decode_triton
    from xlstm_tune.kernels.decode_tiles import shape_name

    for key, config in sorted(getattr(decode_triton._fused_gemv_kernel, "cache", {}).items(), key=str):
        print(f"product {shape_name(key[:4])}: autotuned {config.kwargs}, {config.num_warps} warps, "
              f"{config.num_stages} stages")
    x = torch.empty(1, device="cuda")
    for key in sorted(decode_triton.pinned_launches):
        bn, bk, warps, stages = decode_triton.pinned_tile(x, key)
        print(f"product {shape_name(key)}: pinned BLOCK_N {bn}, BLOCK_K {bk}, {warps} warps, {stages} stages")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="xlstm-350m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode.py needs CUDA (graph decode): none is available here", file=sys.stderr)
        return 2
    model = load_model(args.model, device="cuda", dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=128, compile=False, decode_mode="graph"))
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    _, state = model(prompt)

    def decode() -> None:
        model.generate(prompt[:, -1:], max_new_tokens=args.tokens, state=[tuple(t.clone() for t in b) for b in state])

    decode()  # capture and warm up
    times = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        decode()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    wall_us = statistics.median(times) / args.tokens * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    busy_us = sum(e.device_time_total for e in kernels) / args.tokens
    weight_bytes = sum(p.numel() * p.element_size() for p in model.net.parameters())
    bw = copy_bandwidth_gb_s()
    floor_us = weight_bytes / (bw * 1e9) * 1e6
    print(f"{args.model} {args.dtype} graph decode on {torch.cuda.get_device_name()} (torch {torch.__version__}), "
          f"path {model.decode_path}, XLSTM_DECODE_PDL={os.environ.get('XLSTM_DECODE_PDL', '1')}")
    print(f"per token: wall {wall_us:.1f} us ({1e6 / wall_us:,.1f} tok/s, CV "
          f"{statistics.pstdev(times) / statistics.mean(times):.1%}), kernels busy {busy_us:.1f} us, "
          f"between kernels {wall_us - busy_us:.1f} us ({(wall_us - busy_us) / wall_us:.0%}); "
          f"weight floor {floor_us:.1f} us ({weight_bytes / 1e9:.2f} GB at {bw:,.0f} GB/s copy)")
    # Per generated token, like the wall figure (generate's first token comes from a one-token forward)
    print(f"kernel launches per token: {sum(e.count for e in kernels) / args.tokens:.1f}")
    print("| kernel | calls / token | us / token | us / call | share of busy |\n|---|---|---|---|---|")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:args.top]:
        print(f"| {e.key[:70]} | {e.count / args.tokens:.1f} | {e.device_time_total / args.tokens:.1f} | "
              f"{e.device_time_total / e.count:.2f} | {e.device_time_total / args.tokens / busy_us:.1%} |")
    print_product_configs()
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
