"""Would the batch-1 products stream faster through TMA, or split along K? Probes against the fused GEMV kernel.

    python benchmarks/gemv_probe.py            # CUDA; TMA needs Hopper or newer

The decode products are bandwidth-bound; Hopper's tensor memory accelerator (TMA) copies weight tiles into
shared memory, several in flight per program (`tl.range(num_stages=...)`), with few registers. For each
decode shape this times one CUDA graph of the fused kernel's plain product with its pinned tile
(`_fused_gemv_kernel`, no prologue or epilogue, no dependent launch), then the same graph with a TMA kernel
for each candidate tile, the layers' weights all distinct (24 or 32 per shape, so nothing stays in L2),
and prints GB/s of both, the best TMA tile, the ratio and the two results' relative difference.

Split-K: each row block's K is cut into SPLIT slices, one program each (SPLIT times the programs, so
more weight bytes in flight on the shapes with few rows); every program writes its partial sums and the
row block's last program to arrive (an acquire-release counter) adds them in slice order, so the result
is deterministic. Neither kernel is part of the decode path; this measures whether one should be.
"""
from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_kernel_ab import alternating_rounds  # noqa: E402
from profile_decode import copy_bandwidth_gb_s  # noqa: E402

from xlstm_tune.kernels import decode_triton as k  # noqa: E402
from xlstm_tune.runtime import device as dev  # noqa: E402


@triton.jit
def _gemv_tma(x_ptr, w_desc, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              STAGES: tl.constexpr):
    """y = W x for one row x; W's tiles come through the descriptor (rows and columns past W read as 0)."""
    pid = tl.program_id(0)
    row0 = pid * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([row0, k0])
        x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K), mask=k0 + tl.arange(0, BLOCK_K) < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    rows = row0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + rows, tl.sum(acc, axis=1), mask=rows < N)


@triton.jit
def _gemv_split_k(x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, N, K: tl.constexpr, stride_wn, SPLIT: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = W x, K in SPLIT slices (program axis 1); the row block's last slice program sums the partials."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    split = tl.program_id(1)
    PER: tl.constexpr = (K + SPLIT * BLOCK_K - 1) // (SPLIT * BLOCK_K) * BLOCK_K  # K per slice, whole tiles
    tile = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows[:, None] * stride_wn + split * PER + tile[None, :]
    w = tl.load(w_ptrs, mask=row_ok[:, None] & (split * PER + tile < K)[None, :], other=0.0,
                eviction_policy="evict_first")
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, PER, BLOCK_K):
        cols = split * PER + k0 + tile
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        nxt = (cols + BLOCK_K < K) & (k0 + BLOCK_K + tile < PER)
        w_next = tl.load(w_ptrs + k0 + BLOCK_K, mask=row_ok[:, None] & nxt[None, :], other=0.0,
                         eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
        w = w_next
    tl.store(part_ptr + split * N + rows, tl.sum(acc, axis=1), mask=row_ok)
    tl.debug_barrier()  # every thread's partials stored before the release
    if tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel") == SPLIT - 1:
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for s in range(SPLIT):
            total += tl.load(part_ptr + s * N + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
        tl.store(y_ptr + rows, total, mask=row_ok)
        tl.store(count_ptr + tl.program_id(0), 0)


# (N, K, the pinned tile of the decode kernel for that shape in decode_tiles.json)
SHAPES = {"7b in": (12304, 4096, (8, 512, 4, 3)), "7b out": (4096, 4096, (8, 512, 4, 3)),
          "7b up|gate": (21888, 4096, (8, 512, 4, 3)), "7b down": (4096, 10944, (4, 512, 4, 3)),
          "350m in": (3080, 1024, (4, 512, 4, 3)), "350m out": (1024, 1024, (4, 1024, 8, 2)),
          "350m up|gate": (5504, 1024, (8, 512, 4, 3)), "350m down": (1024, 2752, (2, 1024, 4, 3))}
SPLIT_TILES = [(split, bn, 512, 4, 3) for split in (2, 4) for bn in (4, 8)]  # (SPLIT, BLOCK_N, BLOCK_K, warps, stages)
TMA_TILES = [(bn, 256, 4, s) for bn in (8, 16, 32) for s in (4, 8)] + [(16, 128, 4, 6)]


def fused_launch(x, w, y, tile):
    """The decode path's own product (`fused_gemv`, no prologue or epilogue) with `tile` pinned."""
    k.PINNED[(*w.shape, k.PRO_NONE, k.EPI_NONE)] = tile
    k.fused_gemv(x, w, y)


def tma_launch(x, desc, y, n, kk, tile):
    bn, bk, warps, stages = tile
    _gemv_tma[(triton.cdiv(n, bn),)](x, desc, y, n, kk, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages, num_warps=warps)


def split_launch(x, w, y, part, count, tile):
    n, kk = w.shape
    split, bn, bk, warps, stages = tile
    _gemv_split_k[(triton.cdiv(n, bn), split)](x, w, y, part, count, n, kk, w.stride(0), SPLIT=split, BLOCK_N=bn,
                                                BLOCK_K=bk, num_warps=warps, num_stages=stages)


def graph_us(fn, replays: int = 20) -> float:
    """Median µs of one replay of a graph of `fn`'s launches."""
    graph, _ = dev.capture_graph("cuda", fn, warmup=1)
    return statistics.median(alternating_rounds([graph], replays, 1)[0])


def fastest(name: str, candidates, ys: list, want) -> tuple | None:
    """(tile, µs, relative difference of the first layer's result to `want`) of the fastest candidate
    (tile, launches) that ran."""
    best = None
    for t, run in candidates:
        try:
            t_c = graph_us(run)
        except Exception as exc:  # noqa: BLE001 - a tile this GPU cannot run: said, skipped
            print(f"  {name} {t}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        diff = float((ys[0] - want).norm() / want.norm())
        if best is None or t_c < best[1]:
            best = (t, t_c, diff)
    return best


def main() -> int:
    if not torch.cuda.is_available():
        print("gemv_probe.py needs CUDA (a Hopper GPU): none is available here", file=sys.stderr)
        return 2
    os.environ["XLSTM_DECODE_PDL"] = "0"  # every kernel here launches plainly, the fused one too
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"copy {copy_bandwidth_gb_s():.0f} GB/s")
    print("| shape | fused (pinned tile) GB/s | best TMA tile | TMA GB/s | TMA / fused | rel diff "
          "| best split-K (split, tile) | split-K GB/s | split-K / fused | rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, kk, tile) in SHAPES.items():
        layers = 32 if name.startswith("7b") else 24
        ws = [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) / kk ** 0.5 for _ in range(layers)]
        x = torch.randn(kk, device="cuda", dtype=torch.bfloat16)
        ys = [torch.empty(n, device="cuda", dtype=torch.float32) for _ in range(layers)]
        nbytes = layers * n * kk * 2
        t_f = graph_us(lambda: [fused_launch(x, w, y, tile) for w, y in zip(ws, ys)])
        want = ys[0].clone()

        def tma_candidate(t):
            descs = [TensorDescriptor.from_tensor(w, [t[0], t[1]]) for w in ws]
            return t, lambda: [tma_launch(x, d, y, n, kk, t) for d, y in zip(descs, ys)]

        def split_candidate(t):
            parts = [torch.empty(t[0], n, device="cuda", dtype=torch.float32) for _ in ws]
            counts = torch.zeros(len(ws), triton.cdiv(n, t[1]), device="cuda", dtype=torch.int32)
            return t, lambda: [split_launch(x, w, y, p, c, t) for w, y, p, c in zip(ws, ys, parts, counts)]

        cells = [f"{name}", f"{nbytes / t_f / 1e3:.0f}"]
        for best in (fastest(name, (tma_candidate(t) for t in TMA_TILES), ys, want),
                     fastest(name, (split_candidate(t) for t in SPLIT_TILES), ys, want)):
            if best is None:
                cells += ["none ran", "", "", ""]
                continue
            t, t_c, diff = best
            cells += [str(t), f"{nbytes / t_c / 1e3:.0f}", f"{t_f / t_c:.3f}", f"{diff:.1e}"]
        print("| " + " | ".join(cells) + " |")
        del ws, ys
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
