"""Record an exhaustive grid of configurations, with each stage's cost, for replayed sampler comparisons.

On one H200 (about 9 minutes; run it again with the same --name to continue an unfinished grid):

    python benchmarks/record_grid.py --experiment experiments/grid_350m_gpu.toml --name xlstm350m_h200_grid \
        --budget-s 540
    python benchmarks/sampler_efficiency.py --data benchmarks/data/xlstm350m_h200_grid

The wider 350M grid meant to separate samplers (36 configurations, estimated ~340 s on one H200):

    python benchmarks/record_grid.py --experiment experiments/grid_350m_gpu_wide.toml --name xlstm350m_h200_wide \
        --budget-s 540

The same grid with Ray installed (every backend: 60 configurations, 72 grid points; ~12 minutes, so two
runs of the command, the second continuing the first): --name xlstm350m_h200_all.

The `streams` knob on one H200 (1 native and 18 queued configurations, ~6.5 minutes):

    python benchmarks/record_grid.py --experiment experiments/grid_350m_gpu_streams.toml \
        --name xlstm350m_h200_streams --budget-s 400

Every decode mode on one H200 (native chunk 64/128/256 x eager/graph/compiled, the queued nine screened; ~5 minutes):

    python benchmarks/record_grid.py --experiment experiments/grid_350m_gpu_decode.toml \
        --name xlstm350m_h200_decode --budget-s 530

Every knob and every backend on one H200 with Ray (102 configurations, 288 grid points; 507 + 149 s in two
runs of the command, the second continuing the first):

    python benchmarks/record_grid.py --experiment experiments/grid_350m_gpu_every_knob.toml \
        --name xlstm350m_h200_every_knob --budget-s 540

On a CPU, eager and compiled decode with what the compile costs (12 configurations, ~30 s on 2 cores):

    python benchmarks/record_grid.py --experiment experiments/grid_tiny_decode.toml --name tiny_cpu_decode

On a CPU, every backend and every CPU knob of the `tiny` model (81 configurations, ~2 minutes on 2 cores):

    python benchmarks/record_grid.py --experiment experiments/grid_tiny.toml --name tiny_cpu_all \
        -- --backend native,queued,ray

On a CPU (the `tiny` model; a narrowed space for a quick check, flags after `--` go to the study):

    python benchmarks/record_grid.py --experiment experiments/grid_tiny.toml --name tiny_cpu_check \
        --budget-s 300 -- --chunk-size 32,64 --heads-per-band 2,4

It runs `python -m xlstm_tune study --sampler grid` on the spec (every value of every knob in its
[space]; the xlstm-350m spec: bf16, every backend) with early stopping on, so a configuration that is
hopeless against the ones measured before it (e.g. step-block prefill far below native) stops after its
first stage and is kept with its partial figures and cost. Every record carries per context the prefill
tok/s, decode tok/s, and `stage_s` (seconds per measurement stage: screen, prefill_ctx<L>, decode,
fidelity) plus `stage_figures`, so replay (study.replay) charges a pruned trial only the stages it ran.
`--no-pruning` measures every configuration to the end. The study's state lives in
benchmarks/data/<name>/study/ (Optuna journal, MLflow store): a run cut by --budget-s continues there.
Results: benchmarks/data/<name>/trials.jsonl and run_meta.json (what `--replay` and sampler_efficiency read).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESERVE_S = 60.0  # after the last trial: the confirmation round (default only), files, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="spec whose [space] is the grid")
    p.add_argument("--name", required=True, help="folder under benchmarks/data/")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="wall-clock budget of the whole recording in seconds (default 540: ~9 minutes)")
    p.add_argument("--device", default=None, help="override [model] device (e.g. cpu)")
    p.add_argument("--no-pruning", action="store_true", help="measure every configuration to the end")
    p.add_argument("study_args", nargs="*", help="after --: more `study` flags (e.g. --chunk-size 32,64)")
    args = p.parse_args(argv)

    data = HERE / "data" / args.name
    work = data / "study"
    work.mkdir(parents=True, exist_ok=True)
    spec_path = Path(args.experiment)
    study_name = f"grid-{args.name}"
    cmd = [sys.executable, "-m", "xlstm_tune", "study", "--experiment", str(spec_path), "--sampler", "grid",
           "--study-name", study_name, "--out-dir", str(work), "--n-trials", "100000", "--no-progress",
           "--timeout", str(max(1.0, args.budget_s - RESERVE_S))]
    if args.device:
        cmd += ["--device", args.device]
    if args.no_pruning:
        cmd += ["--no-early-stopping"]
    cmd += args.study_args
    print("recording:", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        print(f"the study failed (exit {proc.returncode}); nothing copied", file=sys.stderr)
        return proc.returncode
    src = work / "studies" / study_name
    for name in ("trials.jsonl", "run_meta.json"):
        shutil.copyfile(src / name, data / name)
    records = [json.loads(line) for line in (data / "trials.jsonl").read_text(encoding="utf-8").splitlines() if line]
    done = [r for r in records if r.get("state") == "COMPLETE" and r.get("duplicate_of") is None]
    pruned = [r for r in records if r.get("state") == "PRUNED" and r.get("stage_figures")]
    failed = [r for r in records if r.get("state") == "FAIL"]
    meta = json.loads((data / "run_meta.json").read_text(encoding="utf-8"))
    finished = any("grid is exhausted" in str(n) for n in meta.get("notes") or [])
    cost = sum(float(r.get("duration_s") or 0) for r in records)
    print(f"\n{data}: {len(done)} configurations measured in full, {len(pruned)} pruned (partial cost kept), "
          f"{len(failed)} failed; {cost:,.0f} s of trials in {time.monotonic() - t0:,.0f} s wall; grid "
          + ("complete" if finished else "NOT complete: run the same command again to continue"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
