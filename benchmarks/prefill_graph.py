"""Native prefill launched from the host against the same prefill replayed from a device graph (CUDA).

    python benchmarks/prefill_graph.py --model xlstm-350m --lengths 2048,8192
    python benchmarks/prefill_graph.py --model xlstm-7b --lengths 2048,8192 --rounds 5

One process, one model: for each length, rounds alternate the two paths (XLSTM_PREFILL_GRAPH off, then
on), each round timing --repeats prefills after the device is synchronised; the table gives each path's
median tok/s over all timed prefills, the ratio graph / launched, the first graph prefill (warm-up run,
capture and the first replay), how far the replayed logits are from the launched ones, and the kernels
counted per prefill (`prefill_paths`), so the switch is shown to have run, not assumed. The launched path is
the baseline, measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWITCH = "XLSTM_PREFILL_GRAPH"


def _timed(model, ids, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def measure_length(model, length: int, rounds: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, length), device=model.device)
    os.environ[SWITCH] = "0"
    launched_logits, _ = model(ids)  # compiles this length
    torch.cuda.synchronize()
    os.environ[SWITCH] = "1"
    t0 = time.perf_counter()
    graph_logits, _ = model(ids)  # warm-up run, capture, first replay
    torch.cuda.synchronize()
    first_graph_s = time.perf_counter() - t0
    ref = launched_logits.float()
    rel = ((graph_logits.float() - ref).norm() / ref.norm()).item()
    times = {"0": [], "1": []}
    model.stats.reset()
    for _ in range(rounds):
        for switch in ("0", "1"):
            os.environ[SWITCH] = switch
            times[switch] += _timed(model, ids, repeats)
    paths = model.stats.as_dict()["prefill_paths"]
    os.environ[SWITCH] = "0"
    launched, graph = statistics.median(times["0"]), statistics.median(times["1"])
    cv = {k: statistics.pstdev(v) / statistics.mean(v) for k, v in times.items()}
    return {"length": length, "launched_tok_s": length / launched, "launched_cv": cv["0"],
            "graph_tok_s": length / graph, "graph_cv": cv["1"], "ratio": launched / graph,
            "first_graph_s": first_graph_s, "rel_err": rel, "bitwise": bool(torch.equal(graph_logits, launched_logits)),
            "paths": paths, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="xlstm-350m")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--chunk-size", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the two paths per length")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills per path per round")
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1 or args.rounds < 1 or args.repeats < 1:
        print("prefill_graph.py: --lengths must be positive integers (e.g. 2048,8192); --rounds and --repeats "
              "at least 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("prefill_graph.py: device graphs need CUDA, which is not available here: run it on a machine "
              "with an NVIDIA GPU", file=sys.stderr)
        return 2
    from xlstm_tune import RuntimeOptions, load_model

    model = load_model(args.model, device="cuda", dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=args.chunk_size, compile=args.compile))
    print(f"{args.model} {args.dtype} on {torch.cuda.get_device_name()}, torch {torch.__version__}, native "
          f"chunk {args.chunk_size}, compile {'on' if args.compile else 'off'}; {args.rounds} rounds x "
          f"{args.repeats} prefills per path, alternating")
    print("| length | launched tok/s (CV) | graph tok/s (CV) | graph / launched | first graph prefill s | "
          "rel. logit diff | bitwise | prefills counted | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in lengths:
        r = measure_length(model, length, args.rounds, args.repeats)
        print(f"| {length} | {r['launched_tok_s']:,.0f} ({r['launched_cv']:.1%}) | {r['graph_tok_s']:,.0f} "
              f"({r['graph_cv']:.1%}) | {r['ratio']:.2f}x | {r['first_graph_s']:.2f} | {r['rel_err']:.2e} | "
              f"{r['bitwise']} | {r['paths']} | {r['peak_gib']:.1f} |", flush=True)
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
