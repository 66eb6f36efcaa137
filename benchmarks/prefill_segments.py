"""Prompts of many lengths, fed whole against fed in pieces (`prefill_segment`): what the first call of each
new length costs, and what a warm prefill costs, in fresh processes.

    python benchmarks/prefill_segments.py --model tiny --device cpu --lengths 96,160,224,288,352 --segment 64
    python benchmarks/prefill_segments.py --model xlstm-350m --device cuda --dtype bfloat16 \
        --lengths 1000,1500,2048,3000,5000 --segment 2048 --prefill-graph

Each mode (whole, then segment) runs in its own process with its own empty compile cache (unless
--keep-compile-cache), so one mode's compiled shapes (and graphs) cannot serve the other. In each, every length is prefilled once cold (the first call: compile, and capture with
--prefill-graph) and then --repeats times warm (median). The table gives both per length and in all, the
piece lengths that ran (counted by the model), and the logits' distance between the two modes; "whole" is
the baseline, measured in the same invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(args: argparse.Namespace) -> dict:
    """One mode in this process: cold and warm seconds per length, the pieces that ran, the last logits."""
    import torch

    from xlstm_tune import RuntimeOptions, load_model
    from xlstm_tune.runtime.device import synchronize

    model = load_model(args.model, device=args.device, dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=args.chunk_size, compile=args.compile))
    gen = torch.Generator().manual_seed(0)
    rows, logits_tail = [], {}
    for length in args.lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=gen).to(model.device)
        model.stats.reset()
        synchronize(model.device)
        t0 = time.perf_counter()
        logits, _ = model(ids)
        synchronize(model.device)
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model(ids)
            synchronize(model.device)
            warm.append(time.perf_counter() - t0)
        counts = model.stats.as_dict()
        rows.append({"length": length, "cold_s": cold, "warm_s": statistics.median(warm),
                     "pieces": counts["prefill_lengths"], "paths": counts["prefill_paths"]})
        logits_tail[length] = logits[0, -1].float().cpu().tolist()
    model.close()
    return {"rows": rows, "logits_tail": logits_tail}


def _paths(counts: dict[str, int]) -> str:
    """A length's prefill calls by path, as counted ('call 6' launched; 'graph:capture 2, graph:replay 12')."""
    return ", ".join(f"{path} {n}" for path, n in sorted(counts.items())) or "none"


def run_mode(args: argparse.Namespace, segment: int) -> dict:
    env = {**os.environ, "XLSTM_PREFILL_SEGMENT": str(segment),
           "XLSTM_PREFILL_GRAPH": "1" if args.prefill_graph else "0"}
    with tempfile.TemporaryDirectory(prefix="prefill_segments_cache_") as cache:
        if not args.keep_compile_cache:  # compile as a process on a fresh machine does, not from this one's cache
            env.update(TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=str(Path(cache) / "triton"))
        return _run(args, env, segment)


def _run(args: argparse.Namespace, env: dict, segment: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--device", args.device, "--dtype",
           args.dtype, "--lengths", ",".join(map(str, args.lengths)), "--chunk-size", str(args.chunk_size),
           "--repeats", str(args.repeats)] + ([] if args.compile else ["--no-compile"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"prefill_segments.py: the {'segment' if segment else 'whole'} run failed "
                         f"(exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="96,160,224,288,352")
    ap.add_argument("--segment", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--prefill-graph", action="store_true", help="replay prefills from device graphs (CUDA)")
    ap.add_argument("--keep-compile-cache", action="store_true",
                    help="let both modes use this machine's compile cache (default: each an empty one, so the "
                         "first call of a length pays its full compile)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.lengths = [int(x) for x in str(args.lengths).split(",") if x.strip()]
    except ValueError:
        args.lengths = []
    if not args.lengths or min(args.lengths) < 1 or args.segment < 1 or args.repeats < 1:
        print("prefill_segments.py: --lengths must be positive integers (e.g. 96,160), --segment and --repeats "
              "at least 1", file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import torch

    modes = {}
    for name, segment in (("whole", 0), (f"segment {args.segment}", args.segment)):
        modes[name] = run_mode(args, segment)  # each mode's totals said as it ends: a cut-off run keeps them
        rows = modes[name]["rows"]
        print(f"prefill_segments.py: {name} done: first calls {sum(r['cold_s'] for r in rows):.2f} s, "
              f"warm {sum(r['warm_s'] for r in rows) * 1e3:.2f} ms over {len(rows)} lengths", file=sys.stderr,
              flush=True)
    whole, cut = modes.values()
    print(f"{args.model} {args.dtype} on {args.device}, torch {torch.__version__}, native chunk {args.chunk_size}, "
          f"compile {'on' if args.compile else 'off'}, prefill graph {'on' if args.prefill_graph else 'off'}; "
          f"segment {args.segment}; each mode in a fresh process with "
          f"{'this machine' if args.keep_compile_cache else 'an empty'} compile cache; warm = median of {args.repeats}")
    print("| length | whole: first call s | whole: warm ms | pieces | segment: first call s | segment: warm ms | "
          "warm ratio | last-logit rel. diff | prefills that ran (whole; pieces) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a, b in zip(whole["rows"], cut["rows"]):
        x = torch.tensor(whole["logits_tail"][str(a["length"])])
        y = torch.tensor(cut["logits_tail"][str(a["length"])])
        rel = float((x - y).norm() / x.norm())
        print(f"| {a['length']} | {a['cold_s']:.2f} | {a['warm_s'] * 1e3:.2f} | {b['pieces']} | {b['cold_s']:.2f} | "
              f"{b['warm_s'] * 1e3:.2f} | {b['warm_s'] / a['warm_s']:.2f}x | {rel:.1e} | "
              f"{_paths(a['paths'])}; {_paths(b['paths'])} |")
    tot = {k: (sum(r[k] for r in whole["rows"]), sum(r[k] for r in cut["rows"])) for k in ("cold_s", "warm_s")}
    shapes = len({n for r in cut["rows"] for n in r["pieces"]})
    print(f"| all {len(args.lengths)} | {tot['cold_s'][0]:.2f} | {tot['warm_s'][0] * 1e3:.2f} | {shapes} lengths | "
          f"{tot['cold_s'][1]:.2f} | {tot['warm_s'][1] * 1e3:.2f} | {tot['warm_s'][1] / tot['warm_s'][0]:.2f}x | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
