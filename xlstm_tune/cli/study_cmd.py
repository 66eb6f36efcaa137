"""`python -m xlstm_tune study`: run (or resume) an Optuna study of the runtime knobs.

With no arguments it runs the embedded quickstart (`tiny` model, best available device, under 3 minutes
on a 2-core CPU) and prints where the results are. See docs/STUDY.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from xlstm_tune.cli.common import (
    add_knob_flags,
    add_model_flags,
    add_prompt_flags,
    add_runtime_flags,
    knob_lists,
    positive,
    runtime_flags,
    prefill_lengths,
)
from xlstm_tune.errors import UserError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "study", help="tune the runtime knobs with an Optuna study (no arguments: the quickstart)",
        description=__doc__.splitlines()[0])
    g = p.add_argument_group("study")
    g.add_argument("--experiment", default=None, metavar="FILE",
                   help="experiment spec (.toml); default: the embedded quickstart")
    g.add_argument("--study-name", default=None, metavar="NAME", help="study name (default: from the spec)")
    g.add_argument("--n-trials", type=int, default=None, metavar="N",
                   help="COMPLETE trials wanted in total (a resumed study only runs the missing ones)")
    g.add_argument("--timeout", type=float, default=None, metavar="SEC",
                   help="stop starting new trials after this many seconds")
    g.add_argument("--trial-timeout", type=float, default=None, metavar="SEC",
                   help="kill a trial running longer than this (failure reason `timeout`)")
    g.add_argument("--sampler", "--mode", dest="sampler", default=None, metavar="NAME",
                   help="tpe (default), ga (NSGA-II), random, grid, gp or cmaes")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="sampler seed")
    g.add_argument("--objective", dest="objectives", action="append", default=None, metavar="NAME",
                   help="optimise this objective (repeat for a Pareto study): prefill_tok_s, decode_tok_s, "
                        "prefill_tok_s_ctx<L>")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage: a database URL (sqlite:///x.db, postgresql://...) or a .journal file; "
                        "default <out-dir>/optuna.journal")
    g.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite <out-dir>/mlflow.db)")
    g.add_argument("--out-dir", default="mlruns", metavar="DIR", help="where results go (default: mlruns)")
    g.add_argument("--replay", default=None, metavar="SOURCE",
                   help="answer trials from a recorded study (trials.jsonl, study dir or name) instead of running the model")
    g.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=None,
                   help="stop hopeless or slow trials after their first stage (default: [pruning] enabled, on)")
    g.add_argument("--warm-start", dest="warm_start", action="append", default=None, metavar="STUDY_OR_FILE",
                   help="seed the study with the Pareto front of an earlier study (a study name under --out-dir, "
                        "a study directory, a trials.jsonl or a best.json; repeatable) and the shipped configs/ "
                        "for the device")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress bar (default: when stderr is a terminal)")
    s = p.add_argument_group("shared studies (several processes on one --storage, see docs/STUDY.md)")
    s.add_argument("--heartbeat-interval", type=int, default=10, metavar="SEC",
                   help="seconds between a running trial's heartbeats (default 10)")
    s.add_argument("--grace-period", type=int, default=60, metavar="SEC",
                   help="a trial whose process sent no heartbeat for this long is failed and re-queued once "
                        "(default 60)")
    s.add_argument("--rebuild-views", action="store_true",
                   help="rewrite trials.jsonl, summary.csv and the missing MLflow child runs from the Optuna "
                        "storage, measuring nothing")
    f = p.add_argument_group("many workers (docs/STUDY.md)")
    f.add_argument("--devices", action="append", default=None, metavar="LIST",
                   help="one trial worker per device on this study: cuda:0,cuda:1 (each sees only its GPU), "
                        "cpu,cpu or cpu:N (N CPU workers, cores split between them)")
    f.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run the trial workers on a Ray cluster (HOST:PORT or auto): one per GPU, else per CPU "
                        "share; with --storage postgresql://... and an http --tracking-uri across hosts")
    f.add_argument("--trials-only", action="store_true",
                   help="run trials and stop: no confirmation round, best.json or report (a plain `study` "
                        "of the same storage does them once the workers are done)")
    add_model_flags(p)
    add_prompt_flags(p)
    add_knob_flags(p, multi=True, best=False)
    add_runtime_flags(p, best=False)
    p.set_defaults(func=run)
    return p


def options_from_args(args: argparse.Namespace) -> Any:
    from xlstm_tune.study.runner import StudyOptions

    for flag, value in (("--n-trials", args.n_trials), ("--timeout", args.timeout),
                        ("--trial-timeout", args.trial_timeout), ("--new-tokens", args.new_tokens),
                        ("--repeats", args.repeats), ("--heartbeat-interval", args.heartbeat_interval),
                        ("--grace-period", args.grace_period)):
        positive(flag, value)
    if args.grace_period <= args.heartbeat_interval:
        raise UserError(f"--grace-period ({args.grace_period} s) must be longer than --heartbeat-interval "
                        f"({args.heartbeat_interval} s): a live trial would be taken for dead")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.trials_only and (args.devices or args.ray_address):
        raise UserError("--trials-only is what each worker of --devices/--ray-address runs: pass one or the other")
    if args.devices and not args.ray_address:
        from xlstm_tune.runtime.device import worker_devices

        for item in args.devices:
            worker_devices(item)  # a device that is not here is refused before anything is opened
    objectives = None
    if args.objectives:
        objectives = [o.strip() for item in args.objectives for o in item.split(",") if o.strip()]
    return StudyOptions(
        experiment=args.experiment, study_name=args.study_name, n_trials=args.n_trials, timeout=args.timeout,
        sampler=args.sampler, seed=args.seed, storage=args.storage, tracking_uri=args.tracking_uri,
        out_dir=args.out_dir, replay=args.replay, model=args.model, device=args.device, dtype=args.dtype,
        compile=args.compile, context_lens=prefill_lengths(args) or None, new_tokens=args.new_tokens,
        repeats=args.repeats, prompt=args.prompt, prompt_file=args.prompt_file, knobs=knob_lists(args),
        trial_timeout=args.trial_timeout, objectives=objectives, progress=args.progress, argv=list(sys.argv),
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period, rebuild_views=args.rebuild_views,
        devices=args.devices, ray_address=args.ray_address, trials_only=args.trials_only,
        config=args.config, runtime=runtime_flags(args),
        early_stopping=args.early_stopping, warm_start=list(args.warm_start or []),
    )


def run(args: argparse.Namespace) -> int:
    from xlstm_tune.study.runner import run_study

    opts = options_from_args(args)
    if opts.ray_address:
        from xlstm_tune.study.fleet import ray_init

        ray_init(opts.ray_address)  # a cluster that cannot be joined is refused before the study is opened
    run_study(opts)
    return 0
