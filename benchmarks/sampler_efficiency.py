"""How much measuring TIME each sampler needs to find a near-optimal configuration, with and without early
stopping, against random search, in replay mode.

    python benchmarks/sampler_efficiency.py                                   # the recorded tiny CPU grid
    python benchmarks/sampler_efficiency.py --data benchmarks/data/xlstm350m_h200_grid --seeds 20
    python benchmarks/sampler_efficiency.py --data benchmarks/data/xlstm350m_h200_grid --samplers random,tpe,ga,gp
    python benchmarks/sampler_efficiency.py --objectives prefill_tok_s --target 0.9 --json

The ground truth is a recorded grid (benchmarks/record_grid.py; default benchmarks/data/tiny_cpu_grid:
every valid configuration of `experiments/grid_tiny.toml` on a 2-core CPU). Each sampler runs replayed
studies (`xlstm_tune.study.replay.replay_costed`) with early stopping on (the study's default rule,
`[pruning]`) and off, one per seed, until a configuration reaches the target.

What a replayed study is charged, per trial, is what the recording spent on the same stages: the sum of
its recorded stage seconds (`stage_s`: screen, which includes the first call and so any compile the
recording paid there; each longer context; decode; fidelity for a trial that completes), up to the stage
the rule stops it at. A replayed study measures first what `study` measures first (the default when the
space holds it, [study] enqueue, the shipped `configs/<device>.toml`), so early stopping has the same
first front as a real study (`--cold-start`: nothing first, the sampler picks every trial). Repeats of a
configuration cost nothing (a study answers them from the first measurement). A configuration the
recording pruned, which the replayed study would measure further, has its remaining stages estimated
(`stage_plan`). Not charged, because every sampler pays them alike: the worker's start, model load and
fidelity reference, the confirmation round, the study's own overhead (the header prints the recorded
figures). Compile costs stay where the recording paid them: a compiled kernel is cached per worker, so the
first configuration of a shape in the recording carries the compile, and a replayed study that reaches
another configuration of that shape first is charged its warm cost.

Target on several objectives: a configuration's score is min over objectives of value / grid optimum;
the target is `--target` (default 95%) of the best score in the grid (1.0 when one configuration is best
on every objective). Reported per sampler and setting, over every seed: the median recorded seconds and
trials to reach it, p20/p80 of the seconds (a run that never reached it within its trial budget, `--budget`,
`--gp-budget` for gp, counts as never), how many never reached it, and random search without early
stopping's median seconds / this median ("vs random").

Each configuration was recorded once. `--noise SIGMA` asks how much the table owes to that one draw: every
seed replays another possible recording, each configuration's figures (prefill per context, decode; the
screen's figure with its context's) scaled by its own factor exp(N(0, SIGMA)), and the optimum, the scores
and the target recomputed from those figures. SIGMA = 0.1 is about the spread of one configuration measured
in different processes on one H200 (docs/PERFORMANCE.md); the recorded repeats' own CV is far smaller.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "data" / "tiny_cpu_grid"
GRID_SPEC = REPO / "experiments" / "grid_tiny.toml"
SAMPLERS = ["random", "tpe", "ga", "gp", "cmaes"]


def record(data: Path) -> None:
    """Measure the tiny grid with the real model (benchmarks/record_grid.py) into `data`."""
    if data.resolve().parent != (HERE / "data").resolve():
        raise SystemExit(f"--record writes benchmarks/data/<name>/: pass --data {HERE / 'data'}/<name>")
    cmd = [sys.executable, str(HERE / "record_grid.py"), "--experiment", str(GRID_SPEC), "--name", data.name]
    print("recording:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=REPO)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile; a run that never reached the target counts as infinity."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    if xs[hi] == xs[lo] or pos == lo:
        return xs[lo]
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt(x: float, spec: str = ",.1f") -> str:
    return "never" if x == float("inf") else format(x, spec)


def scores(lookup: dict, objectives: list[str], optimum: dict[str, float]) -> dict[str, float]:
    """Per configuration key: min over objectives of value / optimum (feasible, fully measured ones)."""
    out = {}
    for key, r in lookup.items():
        if not bool(r.get("fidelity_passed", r.get("feasible", True))):
            continue
        vals = [r.get(o) for o in objectives]
        if any(not isinstance(v, (int, float)) for v in vals):
            continue
        out[key] = min(float(v) / optimum[o] for v, o in zip(vals, objectives))
    return out


FIGURE = re.compile(r"^(prefill_tok_s_ctx\d+|decode_tok_s)$")


def perturbed(src, sigma: float, seed: int):
    """A copy of the recorded source as another recording might have measured it: each configuration's
    figures scaled by their own lognormal factor (its screen and partial figures by the same factor as its
    full ones), `prefill_tok_s` by the geometric mean of its contexts' factors, so it stays their mean."""
    rng = random.Random(seed)
    out = copy.copy(src)
    factors: dict[tuple[str, str], float] = {}

    def scale(key: str, rec: dict) -> dict:
        rec = copy.deepcopy(rec)
        figures = [k for k in rec if FIGURE.match(k)]
        for stage in (rec.get("stage_figures") or {}).values():
            figures += [k for k in stage if FIGURE.match(k)]
        logs = []
        for fig in dict.fromkeys(figures):
            f = factors.setdefault((key, fig), math.exp(rng.gauss(0.0, sigma)))
            for name in (fig, f"{fig}_p20", f"{fig}_p80"):
                if isinstance(rec.get(name), (int, float)):
                    rec[name] *= f
            for stage in (rec.get("stage_figures") or {}).values():
                if isinstance(stage.get(fig), (int, float)):
                    stage[fig] *= f
            if fig.startswith("prefill_tok_s_ctx") and isinstance(rec.get(fig), (int, float)):
                logs.append(math.log(f))
        if logs and isinstance(rec.get("prefill_tok_s"), (int, float)):
            rec["prefill_tok_s"] *= math.exp(sum(logs) / len(logs))
        return rec

    out.lookup = {k: scale(k, r) for k, r in src.lookup.items()}
    out.partial = {k: scale(k, r) for k, r in src.partial.items()}
    return out


def grid_cost(src) -> dict[str, float]:
    """The recorded seconds of the grid's distinct configurations, as replay charges them (stage costs)."""
    def stages(r: dict) -> float:
        return sum(float(v or 0) for v in (r.get("stage_s") or {}).values()) or float(r.get("duration_s") or 0)

    def compile_s(r: dict) -> float:
        return float((r.get("phases") or {}).get("compile_s") or 0)  # the first calls' seconds

    sessions = (src.run_meta or {}).get("sessions") or []
    return {"complete": sum(stages(r) for r in src.lookup.values()),
            "compile": sum(compile_s(r) for r in src.lookup.values()),
            "fidelity": sum(float((r.get("stage_s") or {}).get("fidelity") or 0) for r in src.lookup.values()),
            "pruned": sum(stages(r) for r in src.partial.values()),
            "pruned_compile": sum(compile_s(r) for r in src.partial.values()),
            "load": sum(float(x.get("load_s") or 0) for x in sessions),
            "confirm": sum(float(x.get("confirm_s") or 0) for x in sessions)}


def main(argv: list[str] | None = None) -> int:
    from xlstm_tune.study.pruning import PruneRule
    from xlstm_tune.study.replay import (
        exhaustive_optimum,
        load_source,
        replay_costed,
        source_capabilities,
        source_model_info,
        source_spec_doc,
    )
    from xlstm_tune.study.samplers import check_sampler
    from xlstm_tune.study.space import SearchSpace
    from xlstm_tune.study.spec import parse_spec

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="recorded grid (trials.jsonl + run_meta.json)")
    p.add_argument("--record", action="store_true", help="measure the tiny grid again before replaying")
    p.add_argument("--seeds", type=int, default=10, help="seeds per sampler and setting (default 10)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated samplers")
    p.add_argument("--objectives", default="prefill_tok_s,decode_tok_s", help="comma-separated objectives")
    p.add_argument("--target", type=float, default=0.95, help="fraction of the best score to reach")
    p.add_argument("--budget", type=int, default=None, help="trials per run at most (default: 2 x grid points)")
    p.add_argument("--gp-budget", type=int, default=40,
                   help="trials per gp run at most (default 40; GPSampler refits per trial, ~0.5 s each on a "
                        "2-core CPU, and a run that never reaches the target runs to its budget)")
    p.add_argument("--study-trials", type=int, default=20,
                   help="the study size samplers are configured for (their start-up phase scales with it)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="replay each seed on a re-drawn recording: figures scaled by exp(N(0, NOISE)) per "
                        "configuration (default 0: the recording as it is)")
    p.add_argument("--cold-start", action="store_true",
                   help="measure nothing first: no default, [study] enqueue or shipped configuration, the "
                        "sampler picks every trial (a grid whose shipped configuration is its optimum otherwise "
                        "ends at the first trial for every sampler)")
    p.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = p.parse_args(argv)
    if not 0.0 <= args.noise <= 1.0:
        print(f"sampler_efficiency.py: --noise must be between 0 and 1 (a relative spread such as 0.1), "
              f"got {args.noise}", file=sys.stderr)
        return 2

    if args.record or not (args.data / "trials.jsonl").is_file():
        record(args.data)
    src = load_source(str(args.data), args.data.parent)
    spec = parse_spec(source_spec_doc(src), f"recorded grid {args.data}")  # type: ignore[arg-type]
    space = SearchSpace.resolve(spec, source_model_info(src), source_capabilities(src))
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    optimum = {o: exhaustive_optimum(src.lookup, space, o)[0] for o in objectives}
    score = scores(src.lookup, objectives, optimum)
    best_score = max(score.values())
    goal = args.target * best_score
    good = sorted(k for k, v in score.items() if v >= goal)
    n_grid = 1
    for d in space.dims.values():
        n_grid *= len(d.values())
    budget = args.budget or 2 * n_grid
    rule_on = PruneRule.from_spec(spec.pruning)
    rule_on = dataclasses.replace(rule_on, enabled=True)
    rule_off = dataclasses.replace(rule_on, enabled=False)
    cost = grid_cost(src)
    print(f"recorded grid {args.data.name}: {len(src.lookup)} measured configurations ({len(src.partial)} pruned "
          f"when recorded), {n_grid} grid points; optimum " +
          ", ".join(f"{o} {optimum[o]:,.0f}" for o in objectives) +
          f"; best score {best_score:.3f} (min over objectives of value/optimum); target {args.target:.0%} of it, "
          f"reached by {len(good)} configuration(s); {args.seeds} seeds, budget {budget} trials" +
          ("; cold start: nothing measured first, the sampler picks every trial" if args.cold_start else "") +
          (f"; noise {args.noise:.0%}: each seed's recording re-drawn, its optimum and target recomputed"
           if args.noise else ""))
    def short(key: str) -> str:
        knobs = dict(kv.split("=", 1) for kv in key.split("|"))
        return "/".join(knobs[k] for k in ("backend", "chunk_size", "heads_per_band", "decode_mode"))

    if len(good) <= 6:
        print("reaching the target (backend/chunk_size/heads_per_band/decode_mode): " + ", ".join(map(short, good)))
    first = (f", of it {cost['compile']:,.1f} s first calls (compile, warm-up) and {cost['fidelity']:,.1f} s fidelity"
             if cost["compile"] else "")
    first_p = f", of it {cost['pruned_compile']:,.1f} s first calls" if cost["pruned_compile"] else ""
    print(f"recorded trial costs, the grid in recording order: {cost['complete'] + cost['pruned']:,.1f} s "
          f"({cost['complete']:,.1f} s for the {len(src.lookup)} measured to the end{first}; {cost['pruned']:,.1f} s "
          f"for the {len(src.partial)} pruned{first_p}); not charged to any sampler: worker start, load and "
          f"reference {cost['load']:,.1f} s, confirmation {cost['confirm']:,.1f} s")

    def world(seed: int):
        """The recording a seed replays, and what reaching the target means in it."""
        if not args.noise:
            return src, score, goal
        drawn = perturbed(src, args.noise, seed)
        best = {o: exhaustive_optimum(drawn.lookup, space, o)[0] for o in objectives}
        drawn_score = scores(drawn.lookup, objectives, best)
        return drawn, drawn_score, args.target * max(drawn_score.values())

    def reaches(events, score_of: dict[str, float], goal_of: float) -> bool:
        return any(e.state == "COMPLETE" and e.feasible and score_of.get(e.key, 0.0) >= goal_of for e in events)

    results: dict[str, dict] = {}
    for name in [s.strip() for s in args.samplers.split(",") if s.strip()]:
        if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
            print(f"  {name}: skipped (pip install cmaes)")
            continue
        try:
            check_sampler(name, len(objectives))
        except Exception as exc:  # noqa: BLE001 - e.g. cmaes with two objectives
            print(f"  {name}: skipped ({exc})")
            continue
        for setting, rule in (("on", rule_on), ("off", rule_off)):
            t0 = time.perf_counter()
            secs, trials, pruned, failures = [], [], [], 0
            run_budget = min(budget, args.gp_budget) if name == "gp" else budget
            for seed in range(args.seeds):
                seen, seen_score, seen_goal = world(seed)

                def reached(events) -> bool:
                    return reaches(events, seen_score, seen_goal)

                events = replay_costed(seen, space, name, seed, objectives, rule, max_trials=run_budget,
                                       sampler_trials=args.study_trials, stop=reached,
                                       enqueue=[] if args.cold_start else None)
                if not reached(events):  # counts as never: the median is over every seed
                    failures += 1
                    secs.append(float("inf"))
                    trials.append(float("inf"))
                    pruned.append(sum(1 for e in events if e.state == "PRUNED"))
                    continue
                secs.append(sum(e.cost_s for e in events))
                trials.append(len(events))
                pruned.append(sum(1 for e in events if e.state == "PRUNED"))
            results[f"{name}/{setting}"] = {"sampler": name, "early_stopping": setting, "budget": run_budget,
                                            "seconds": secs,
                                            "trials": trials, "pruned": pruned, "failures": failures,
                                            "wall_s": time.perf_counter() - t0}
            print(f"  {name}, early stopping {setting}: {args.seeds} seeds in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)

    inf = float("inf")
    base = results.get("random/off")
    base_med = statistics.median(base["seconds"]) if base and base["seconds"] else None
    header = ["sampler", "early stop", "seconds median", "p20", "p80", "trials median", "pruned median",
              "not reached", "vs random"]
    rows = []
    for r in results.values():
        s = r["seconds"]
        med = statistics.median(s) if s else None
        ratio = "-"
        if base_med is not None and med is not None and base_med < inf and 0 < med < inf:
            ratio = f"{base_med / med:.2f}x"
        rows.append([r["sampler"], r["early_stopping"], fmt(med) if med is not None else "-",
                     fmt(quantile(s, .2)) if s else "-", fmt(quantile(s, .8)) if s else "-",
                     fmt(statistics.median(r["trials"]), ".1f") if r["trials"] else "-",
                     f"{statistics.median(r['pruned']):.1f}" if r["pruned"] else "-",
                     f"{r['failures']}/{args.seeds}" + (f" in {r['budget']}" if r["budget"] != budget else ""),
                     ratio])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)] if rows else []
    print()
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)))
    print(f"\nseconds: recorded trial seconds until a configuration scores >= {goal:.3f} (medians over every seed; "
          f"a run that never reached it within its trial budget counts as never); trials: trials run by then "
          f"(repeats of a configuration are free); vs random: random search without early stopping's median "
          f"seconds / this median.")
    if args.json:
        clean = {k: dict(v, seconds=[x if x < inf else None for x in v["seconds"]],
                         trials=[x if x < inf else None for x in v["trials"]]) for k, v in results.items()}
        print(json.dumps({"optimum": optimum, "best_score": best_score, "goal": goal, "budget": budget,
                          "results": clean}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
