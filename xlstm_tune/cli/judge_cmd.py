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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xlstm_tune.errors import UserError
from xlstm_tune.tracking.mlflow_log import TAG_ROLE, TAG_STUDY, StudyTracker, resolve_tracking_uri
from xlstm_tune.tracking.study_files import StudyFiles, write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from mlflow import MlflowClient

    from xlstm_tune.quality.judges import JudgeResult

RATINGS_JSONL = "ratings.jsonl"
RATINGS_CSV = "ratings.csv"


# ---- shared with plot_cmd ------------------------------------------------------------------------
def existing_study(out_dir: str | Path, name: str) -> StudyFiles:
    """The study's files, or a one-line UserError naming the studies that do exist under out_dir."""
    sf = StudyFiles.for_study(out_dir, name)  # rejects names that cannot be directory names
    if sf.root.is_dir():
        return sf
    studies_dir = Path(out_dir) / "studies"
    known = sorted(p.name for p in studies_dir.iterdir() if p.is_dir()) if studies_dir.is_dir() else []
    if known:
        shown = ", ".join(known[:10]) + (f" (+{len(known) - 10} more)" if len(known) > 10 else "")
        hint = f"studies there: {shown}"
    else:
        hint = "no studies there; pass --out-dir DIR where the study was run"
    raise UserError(f"no study {name!r} in {studies_dir} ({hint})")


@dataclass
class StudyRuns:
    """Read-only handle on a study's MLflow runs; `note` says why something is unavailable."""

    client: "MlflowClient | None" = None
    tracker: StudyTracker | None = None  # parent found: find_trial_runs / log_parent_artifacts work
    note: str | None = None
    _children: dict[int, str] | None = field(default=None, repr=False)

    def child_run_id(self, record: dict[str, Any]) -> str | None:
        """The trial's child run: its `mlflow_run_id` when that run exists, else found by tag."""
        if self.client is None:
            return None
        run_id = record.get("mlflow_run_id")
        if isinstance(run_id, str) and run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.lifecycle_stage != "deleted":
                    return run_id
            except Exception:  # noqa: BLE001 - a stale id falls back to the tag lookup
                pass
        if self.tracker is None:
            return None
        if self._children is None:
            self._children = {n: r.info.run_id for n, r in self.tracker.find_trial_runs().items()}
        number = record.get("number")
        return self._children.get(number) if isinstance(number, int) else None


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:":
            return Path(db)
    return None


def open_study_runs(tracking_uri: str, study_name: str) -> StudyRuns:
    """Find the study's parent run (tags `xlstm_tune.study`, role parent) in any experiment.

    Never creates anything: a sqlite store file that does not exist is reported, not created, and
    the parent run is attached as it is (its status is left alone).
    """
    db = _sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return StudyRuns(note=f"no MLflow store at {db}")
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        parents = client.search_runs(
            exp_ids,
            filter_string=f"tags.`{TAG_STUDY}` = '{study_name}' and tags.`{TAG_ROLE}` = 'parent'",
            order_by=["attributes.start_time ASC"],
            max_results=10,
        ) if exp_ids else []
    except Exception as exc:  # noqa: BLE001 - an unreadable store must not cost the written files
        return StudyRuns(note=f"cannot read the MLflow store {tracking_uri}: {' '.join(str(exc).split())[:200]}")
    if not parents:
        return StudyRuns(client=client, note=f"no MLflow parent run for study {study_name!r} in {tracking_uri}")
    parent = parents[0]  # the oldest, as StudyTracker.start_parent picks it
    exp = client.get_experiment(parent.info.experiment_id)
    tracker = StudyTracker(tracking_uri, exp.name)
    tracker.experiment_id = exp.experiment_id
    tracker.parent_run_id = parent.info.run_id
    tracker.study_name = study_name
    return StudyRuns(client=client, tracker=tracker)


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
