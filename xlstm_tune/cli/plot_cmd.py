"""`python -m xlstm_tune plot`: redraw a study's plots and report, and attach them to its MLflow run.

    python -m xlstm_tune plot --study NAME [--out-dir mlruns] [--tracking-uri URI] [--storage URL]

Writes `<out-dir>/studies/<NAME>/plots/*.png` (``quality.plots.plot_all``) and `report.md`
(``quality.report.write_report``), then logs both to the study's MLflow parent run when one exists.
Knob importances come from the study's Optuna storage (``optuna.importance.get_param_importances``):
`--storage`, else a `storage` recorded in run_meta.json, else `<out-dir>/optuna.journal`; when it
cannot be opened or holds fewer than two complete trials, the importance plot is skipped and the
report says why.

:func:`make_study_plots` is the whole command as a function, for the study command to call at its end.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from xlstm_tune.cli.judge_cmd import add_store_flags
from xlstm_tune.study.plotting import make_study_plots


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plot", help="draw a study's plots and report.md, log them to MLflow",
        description="Write plots/*.png and report.md for a study and attach them to its MLflow parent run.",
    )
    add_store_flags(p)
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage for knob importances (default: run_meta.json's, else OUT_DIR/optuna.journal)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    outcome = make_study_plots(args.out_dir, args.study, args.tracking_uri, args.storage)
    print(f"{len(outcome.plots)} plot(s) in {outcome.plots[0].parent if outcome.plots else '-'}")
    print(f"report: {outcome.report}")
    if outcome.mlflow_run_id:
        print(f"MLflow: plots and report logged to parent run {outcome.mlflow_run_id}")
    for note in outcome.notes:
        if not note.startswith("MLflow:") or outcome.mlflow_run_id is None:
            print(f"note: {note}", file=sys.stderr)
    return 0
