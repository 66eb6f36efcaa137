"""Batch-1 GEMV: the framework's F.linear against our Triton kernel, on the decode shapes (CUDA).

    python benchmarks/gemv_bench.py

For each weight shape of xlstm-7b / xlstm-350m decode: time per call (CUDA events, median of 50 after
warm-up), achieved bandwidth (weight bytes / time) against the device copy bandwidth measured in the
same run, and the relative error of both against a float64 product.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from xlstm_tune.kernels.gemv_triton import gemv  # noqa: E402

SHAPES = {  # name: (N out, K in)
    "7b qkvo+gates": (12304, 4096), "7b ffn up|gate": (21888, 4096), "7b ffn down": (4096, 10944),
    "7b out_proj": (4096, 4096), "7b lm_head": (50304, 4096),
    "350m qkvo+gates": (3080, 1024), "350m ffn up|gate": (5504, 1024), "350m ffn down": (1024, 2752),
}


def bench(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main() -> None:
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gb_s = 2 * src.numel() / bench(lambda: dst.copy_(src), 20) / 1e9
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy_gb_s:.0f} GB/s")
    print("| shape | N x K | F.linear us | GB/s | triton us | GB/s | speed-up | rel err linear | rel err triton |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]  # rotate: beat the L2
        x = torch.randn(1, 1, k, device="cuda", dtype=torch.bfloat16)
        it = iter(range(10 ** 9))
        t_lin = bench(lambda: torch.nn.functional.linear(x, ws[next(it) % 3]))
        t_tri = bench(lambda: gemv(x, ws[next(it) % 3]))
        ref = x.double().view(1, k) @ ws[0].double().T
        err = lambda y: float((y.double().view(1, n) - ref).norm() / ref.norm())  # noqa: E731
        e_lin = err(torch.nn.functional.linear(x, ws[0]))
        e_tri = err(gemv(x, ws[0]))
        nbytes = n * k * 2
        print(f"| {name} | {n}x{k} | {t_lin * 1e6:.1f} | {nbytes / t_lin / 1e9:.0f} | {t_tri * 1e6:.1f} | {nbytes / t_tri / 1e9:.0f} "
              f"| {t_lin / t_tri:.2f}x | {e_lin:.1e} | {e_tri:.1e} |")


if __name__ == "__main__":
    main()
