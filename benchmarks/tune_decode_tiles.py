"""Measure the batch-1 decode products' tiles inside the captured decode graph, and pin the best (CUDA).

    python benchmarks/tune_decode_tiles.py --model xlstm-350m            # measure and print
    python benchmarks/tune_decode_tiles.py --model xlstm-350m --write    # and pin the picks for this GPU

Triton's autotuner times a product's tiles in isolation, once per process, and its pick for a shape can
change between processes by more than a kernel change is worth (docs/PERFORMANCE.md, 2026-12-03). This
measures where it matters: the model's fused decode step captured in a graph and replayed. Shape by shape
(largest weight first), each tile of the autotuner's list is fixed for that shape (the others keep the
incumbent's: first the autotuner's picks of this process), the step captured, and its graph replayed in
alternating rounds against the incumbent's graph. A tile replaces the incumbent when its median
per-round time is lower by more than --min-gain. Every candidate's one-step logits are compared with the
autotuned step's (the tile changes only the order of float32 sums). At the end the picks race the
autotuner's picks again; --write stores them in xlstm_tune/kernels/decode_tiles.json under this GPU's name,
where the fused decode step uses them instead of autotuning those shapes.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_kernel_ab import alternating_rounds  # noqa: E402  (beside this script)
from xlstm_tune import RuntimeOptions, load_model  # noqa: E402
from xlstm_tune.bench.harness import clone_state  # noqa: E402
from xlstm_tune.kernels.decode_tiles import TILES_FILE, save_tiles, shape_name  # noqa: E402
from xlstm_tune.model.fused_decode import FusedDecodeStep  # noqa: E402
from xlstm_tune.runtime import device as dev  # noqa: E402


def tile_of(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages


def race(graphs: list, rounds: int, tokens: int) -> list[float]:
    """Median µs per token of each graph over alternating rounds."""
    return [statistics.median(t) for t in alternating_rounds(graphs, rounds, tokens)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="xlstm-350m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64, help="replays per round and graph")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds per comparison")
    ap.add_argument("--min-gain", type=float, default=0.01, help="a tile must be this much faster to be picked")
    ap.add_argument("--write", action="store_true", help=f"pin the picks for this GPU in {TILES_FILE}")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tune_decode_tiles.py needs CUDA (graph capture): none is available here", file=sys.stderr)
        return 2
    k = importlib.import_module("xlstm_tune.kernels.decode_triton")
    model = load_model(args.model, device="cuda", dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=128, compile=False, decode_mode="eager"))
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    _, state0 = model(prompt)
    token = prompt[:, -1:].clone()
    step = FusedDecodeStep(model.net, k)
    state = clone_state(state0)

    def one_step() -> torch.Tensor:
        return step(token, clone_state(state0)).clone()

    # The autotuner's own picks first, whatever the shipped file pins: the baseline the picks must beat.
    k.PINNED.clear()
    shipped_lookup = k._shipped_tiles
    k._shipped_tiles = lambda device_index: {}
    try:
        reference = one_step()
    finally:
        k._shipped_tiles = shipped_lookup
    autotuned = {key[:4]: tile_of(cfg) for key, cfg in k._fused_gemv_kernel.cache.items()}
    shipped = {key: k.pinned_tile(token, key) for key in autotuned}
    incumbent = {**autotuned, **{key: t for key, t in shipped.items() if t is not None}}
    name = torch.cuda.get_device_name()
    print(f"{args.model} {args.dtype} on {name} (torch {torch.__version__}); {len(incumbent)} product shapes "
          f"({sum(t is not None for t in shipped.values())} pinned by {TILES_FILE.name}, which the race starts "
          f"from); {args.rounds} rounds of {args.tokens} replays per comparison")

    def capture():
        graph, _ = dev.capture_graph("cuda", lambda: step(token, state))
        return graph

    def weight(key) -> int:
        n, kk, _, epilogue = key
        return n * kk * (2 if epilogue == 2 else 1)

    k.PINNED.update(incumbent)
    for key in sorted(incumbent, key=weight, reverse=True):
        base_graph = capture()
        rows = []
        for config in k._CONFIGS:
            tile = tile_of(config)
            if tile == incumbent[key]:
                continue
            k.PINNED[key] = tile
            try:
                graph = capture()
            except Exception as exc:  # noqa: BLE001 - e.g. a tile this GPU cannot hold: skipped, said why
                rows.append((tile, None, f"not run: {type(exc).__name__}: {exc}"[:100]))
                continue
            out = one_step()
            diff = float((out.double() - reference.double()).norm() / reference.double().norm())
            t_inc, t_new = race([base_graph, graph], args.rounds, args.tokens)
            rows.append((tile, t_inc / t_new, f"{t_inc:.1f} -> {t_new:.1f} us per token, logits {diff:.1e}"))
            del graph
        best = max((r for r in rows if r[1] is not None), key=lambda r: r[1], default=None)
        picked = best is not None and best[1] > 1 + args.min_gain
        if picked:
            incumbent[key] = best[0]
        k.PINNED[key] = incumbent[key]
        print(f"\n{shape_name(key)}: {'picked ' + str(best[0]) if picked else 'kept ' + str(incumbent[key])} "
              f"[BLOCK_N, BLOCK_K, warps, stages] (autotuned: {autotuned.get(key)})")
        for tile, ratio, note in rows:
            print(f"  {tile}: {'-' if ratio is None else f'{ratio:.3f}x'}  {note}")

    k.PINNED.clear()
    k.PINNED.update(autotuned)
    auto_graph = capture()
    k.PINNED.update(incumbent)
    pick_graph = capture()
    t_auto, t_pick = race([auto_graph, pick_graph], 2 * args.rounds, args.tokens)
    print(f"\nthe picks against this process's autotuned tiles: {t_auto:.1f} -> {t_pick:.1f} us per token "
          f"({t_auto / t_pick:.3f}x)")
    if args.write:
        print(f"pinned for {name}: {save_tiles(name, incumbent)}")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
