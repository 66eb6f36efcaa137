"""Two versions of the fused decode kernels in one process, replayed in alternation (CUDA).

    git archive <commit> xlstm_tune | tar -x -C .base       # the baseline tree
    python benchmarks/decode_kernel_ab.py --base .base/xlstm_tune/kernels/decode_triton.py --model xlstm-350m

Between processes on one GPU the same decode step has moved by up to 27% (docs/PERFORMANCE.md), more than
most kernel changes are worth; inside one process, rounds taken back to back see the same machine. So this
loads `--base` as a second kernel module beside this tree's, captures the model's fused decode step (batch
`--batch`) into one graph with each, and replays them in alternation: `--rounds` rounds of `--tokens`
replays each, the order swapped every round. It prints µs per token per round for both, the per-round
ratio base / this tree and its median (> 1: this tree is faster), and the relative difference of the two
steps' logits from the same state (they must compute the same thing). The graphs hold the step only (no
argmax, no token copy), so only the kernels differ. Both modules must offer what model/fused_decode.py
calls: fused_gemv, mlstm_decode_cell, cell_sync_buffer, MAX_FUSED_BATCH.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlstm_tune import RuntimeOptions, load_model  # noqa: E402
from xlstm_tune.bench.harness import clone_state  # noqa: E402
from xlstm_tune.model.fused_decode import FusedDecodeStep  # noqa: E402
from xlstm_tune.runtime import device as dev  # noqa: E402


def load_kernels(path: Path):
    """The kernel file at `path` as its own module (its autotuned kernels tuned and cached apart)."""
    spec = importlib.util.spec_from_file_location("decode_triton_base", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"decode_kernel_ab.py: cannot load {path}: give the baseline tree's decode_triton.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def alternating_rounds(graphs: list, rounds: int, tokens: int) -> list[list[float]]:
    """µs per token of each graph in each of `rounds` rounds of `tokens` replays, the order of the graphs
    reversed every other round, so neither always runs first."""
    times: list[list[float]] = [[] for _ in graphs]
    order = list(range(len(graphs)))
    for r in range(rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(tokens):
                graphs[i].replay()
            torch.cuda.synchronize()
            times[i].append((time.perf_counter() - t0) / tokens * 1e6)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the baseline tree's xlstm_tune/kernels/decode_triton.py")
    ap.add_argument("--model", default="xlstm-350m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=128, help="replays per round and variant")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("decode_kernel_ab.py needs CUDA (graph capture): none is available here", file=sys.stderr)
        return 2
    if not args.base.is_file():
        print(f"decode_kernel_ab.py: --base {args.base} is not a file: give the baseline tree's "
              "xlstm_tune/kernels/decode_triton.py", file=sys.stderr)
        return 2
    kernels = {"base": load_kernels(args.base),
               "this tree": importlib.import_module("xlstm_tune.kernels.decode_triton")}
    model = load_model(args.model, device="cuda", dtype=args.dtype,
                       runtime=RuntimeOptions(backend="native", chunk_size=128, compile=False, decode_mode="eager"))
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, 16), device="cuda")
    _, state0 = model(prompt)
    token = prompt[:, -1:].clone()
    step = FusedDecodeStep(model.net, kernels["this tree"])
    state = clone_state(state0)

    logits = {}
    for name, k in kernels.items():  # one step from the same state, outside any graph: the same result?
        step.k = k
        logits[name] = step(token, clone_state(state0)).clone()
    a, b = logits["base"].double(), logits["this tree"].double()
    print(f"{args.model} {args.dtype} batch {args.batch} on {torch.cuda.get_device_name()} "
          f"(torch {torch.__version__}); logits of one step, this tree against base: "
          f"relative difference {float((b - a).norm() / a.norm()):.2e}")

    graphs = {}
    for name, k in kernels.items():  # the step object's buffers are shared; each graph holds its own launches
        step.k = k
        graphs[name], _ = dev.capture_graph("cuda", lambda: step(token, state))
    times = dict(zip(graphs, alternating_rounds(list(graphs.values()), args.rounds, args.tokens)))
    ratios = [tb / tt for tb, tt in zip(times["base"], times["this tree"])]
    print("| round | base (µs per token) | this tree (µs per token) | base / this tree |\n|---|---|---|---|")
    for r, (tb, tt, q) in enumerate(zip(times["base"], times["this tree"], ratios)):
        print(f"| {r} | {tb:.1f} | {tt:.1f} | {q:.3f} |")
    print(f"median: base {statistics.median(times['base']):.1f} µs, "
          f"this tree {statistics.median(times['this tree']):.1f} µs per token; "
          f"ratio median {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}–{max(ratios):.3f}; "
          f"> 1: this tree is faster)")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
