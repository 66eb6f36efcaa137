"""Batched-decode products: the framework's F.linear against our row kernel, on the decode shapes (CUDA).

    python benchmarks/decode_rows_bench.py --batch 1,2,4,8,16

For each weight shape of xlstm-7b / xlstm-350m decode and each batch size B: time per call (CUDA events,
median of 50 after warm-up), achieved weight bandwidth (weight bytes / time: the weights are read once for
all B rows) against the device copy bandwidth measured in the same run, and the relative error of both
against a float64 product. B = 1 runs our GEMV kernel (the one the fused step uses at batch 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_bench import SHAPES, bench  # noqa: E402

from xlstm_tune.kernels.decode_triton import fused_gemv  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,2,4,8,16", help="batch sizes, e.g. 1,8,16")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    src = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_gb_s = 2 * src.numel() / bench(lambda: dst.copy_(src), 20) / 1e9
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {copy_gb_s:.0f} GB/s")
    print("| shape | N x K | B | F.linear us | GB/s | ours us | GB/s | speed-up | rel err linear | rel err ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(3)]  # rotate: beat the L2
        for b in batches:
            x = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(b, n, device="cuda", dtype=torch.float32)
            it = iter(range(10 ** 9))
            t_lin = bench(lambda: torch.nn.functional.linear(x, ws[next(it) % 3]))
            t_ours = bench(lambda: fused_gemv(x, ws[next(it) % 3], out))
            ref = x.double() @ ws[0].double().T
            err = lambda y: float((y.double() - ref).norm() / ref.norm())  # noqa: E731
            e_lin = err(torch.nn.functional.linear(x, ws[0]))
            e_ours = err(fused_gemv(x, ws[0], out))
            nbytes = n * k * 2
            print(f"| {name} | {n}x{k} | {b} | {t_lin * 1e6:.1f} | {nbytes / t_lin / 1e9:.0f} | {t_ours * 1e6:.1f} "
                  f"| {nbytes / t_ours / 1e9:.0f} | {t_lin / t_ours:.2f}x | {e_lin:.1e} | {e_ours:.1e} |")


if __name__ == "__main__":
    main()
