"""`python -m xlstm_tune judge`: (re)judge a finished study's saved continuations.

    python -m xlstm_tune judge --study NAME [--out-dir mlruns]
        [--judge builtin|ollama|openai --judge-url URL --judge-model M] [--tracking-uri URI]

Reads `<out-dir>/studies/<NAME>/outputs/trial_<n>.txt` and the prompt from run_meta.json, asks the
judge about each output, then writes, in this order, only once every output is judged:

    ratings.jsonl, ratings.csv   one rating per trial (atomic rewrites)
    summary.csv                  trial records with the judge columns merged in (atomic rewrite)
    MLflow                       judge_coherence/_relevance/_fluency/_overall/_valid on each trial's
                                 child run; the ratings files as artifacts of the study's parent run

The study's MLflow runs are found read-only (no run is reopened or created); a store that does not
exist yet is left alone (the files are still written, and the command says MLflow was skipped).

This module also holds the small study-lookup helpers the `plot` command shares.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from xlstm_tune.errors import UserError
from xlstm_tune.quality.judging import RATINGS_CSV, RATINGS_JSONL
from xlstm_tune.tracking.mlflow_log import resolve_tracking_uri
from xlstm_tune.tracking.study_lookup import existing_study, open_study_runs
from xlstm_tune.tracking.study_files import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from xlstm_tune.quality.judges import JudgeResult



def add_store_flags(parser: argparse.ArgumentParser) -> None:
    """--study, --out-dir and --tracking-uri, as `judge` and `plot` share them."""
    parser.add_argument("--study", "--study-name", dest="study", required=True, metavar="NAME",
                        help="name of the study (its folder under OUT_DIR/studies/)")
    parser.add_argument("--out-dir", default="mlruns", metavar="DIR",
                        help="where the study's results are (default: mlruns)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite in OUT_DIR)")


# ---- the command ---------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "judge", help="(re)judge a study's saved continuations",
        description="Score each trial's saved continuation with a judge; write ratings.jsonl/.csv, "
                    "merge the scores into summary.csv and the trials' MLflow runs.",
    )
    add_store_flags(p)
    p.add_argument("--judge", default="builtin", choices=("builtin", "ollama", "openai"),
                   help="builtin (offline heuristic, default), ollama or openai (OpenAI-compatible server)")
    p.add_argument("--judge-url", default=None, metavar="URL",
                   help="judge server, e.g. http://127.0.0.1:11434 (ollama) or http://HOST:8000/v1 (openai)")
    p.add_argument("--judge-model", default=None, metavar="M", help="model name on the judge server")
    p.set_defaults(func=run)


def _progress(number: int, result: "JudgeResult") -> None:
    if result.valid and result.scores is not None:
        s = result.scores
        print(f"  trial {number}: overall {s.overall} (coherence {s.coherence}, relevance {s.relevance}, "
              f"fluency {s.fluency})", flush=True)
    else:
        print(f"  trial {number}: invalid answer: {result.error}", flush=True)


def run(args: argparse.Namespace) -> int:
    from mlflow.entities import Metric, RunTag

    from xlstm_tune.quality.judges import make_judge
    from xlstm_tune.quality.judging import (
        find_prompt,
        judge_outputs,
        merge_ratings,
        rating_metrics,
        ratings_csv,
        ratings_jsonl,
        read_outputs,
    )

    # Every check that can fail on bad input runs before any judging or writing.
    sf = existing_study(args.out_dir, args.study)
    judge = make_judge(args.judge, args.judge_url, args.judge_model)
    uri = resolve_tracking_uri(args.tracking_uri, args.out_dir)
    outputs = read_outputs(sf.outputs_dir)
    if not outputs:
        raise UserError(f"study {args.study!r} has no saved outputs ({sf.outputs_dir}/trial_<n>.txt): "
                        "nothing to judge; run trials that complete first")
    records = sf.read_trials()
    prompt = find_prompt(sf.read_run_meta(), sf.root)
    if prompt is None:
        print(f"note: {sf.run_meta_path.name} records no prompt: judging with an empty prompt "
              "(relevance scores mean little)", file=sys.stderr)

    print(f"judging {len(outputs)} output(s) of study {args.study!r} with {judge.name}", flush=True)
    ratings = judge_outputs(judge, prompt, outputs, on_result=_progress)
    valid = [r for r in ratings if r["judge_valid"]]
    if not valid and args.judge != "builtin":
        first = ratings[0]["judge_error"]
        raise UserError(f"the {judge.name} judge gave no valid answer for any of {len(ratings)} output(s) "
                        f"(first: {first}); check --judge-url/--judge-model. Nothing was written")

    write_text_atomic(sf.root / RATINGS_JSONL, ratings_jsonl(ratings))
    write_text_atomic(sf.root / RATINGS_CSV, ratings_csv(ratings))
    known = {r.get("number") for r in records}
    orphans = sorted(n for n in outputs if n not in known)
    if records:
        sf.write_summary_csv(merge_ratings(records, ratings))

    runs = open_study_runs(uri, args.study)
    logged = 0
    missing: list[int] = []
    if runs.client is not None:
        by_number = {r["number"]: r for r in records}
        now_ms = int(time.time() * 1000)
        for rating in ratings:
            record = by_number.get(rating["number"], {"number": rating["number"]})
            run_id = runs.child_run_id(record)
            if run_id is None:
                missing.append(rating["number"])
                continue
            metrics = [Metric(k, v, now_ms, 0) for k, v in rating_metrics(rating).items()]
            tags = [RunTag("xlstm_tune.judge", str(rating["judge"]))]
            if rating.get("judge_rationale"):
                tags.append(RunTag("xlstm_tune.judge_rationale", str(rating["judge_rationale"])[:5000]))
            runs.client.log_batch(run_id, metrics=metrics, tags=tags)
            logged += 1
        if runs.tracker is not None:
            runs.tracker.log_parent_artifacts([sf.root / RATINGS_JSONL, sf.root / RATINGS_CSV],
                                              artifact_path="judge")

    mean = sum(r["judge_overall"] for r in valid) / len(valid) if valid else float("nan")
    print(f"{len(valid)}/{len(ratings)} valid rating(s), mean overall {mean:.2f}")
    print(f"ratings: {sf.root / RATINGS_JSONL} and {sf.root / RATINGS_CSV}")
    if records:
        print(f"summary: {sf.summary_path} (judge columns merged)")
    else:
        print("summary: not rewritten (trials.jsonl has no records)")
    if orphans:
        print(f"note: output(s) of trial(s) {orphans} have no record in trials.jsonl", file=sys.stderr)
    if runs.client is None:
        print(f"MLflow: skipped ({runs.note})")
    else:
        where = f"; ratings files on the parent run {runs.tracker.parent_run_id}" if runs.tracker else ""
        print(f"MLflow: judge metrics on {logged} trial run(s){where}")
        if missing:
            print(f"note: no MLflow run found for trial(s) {missing}"
                  + (f" ({runs.note})" if runs.note else ""), file=sys.stderr)
    return 0
