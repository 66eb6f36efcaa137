"""`python -m xlstm_tune export`: write a study's best.json, or check one.

    python -m xlstm_tune export --study NAME [--context-len N] [--out PATH] [--out-dir mlruns]
    python -m xlstm_tune export --check PATH

Without --out the best.json is printed to stdout. --check validates a file (schema, fields, knob values)
and prints a one-line summary; an invalid file is a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from xlstm_tune.errors import UserError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write a study's best.json (or --check one)",
                              description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--study", "--study-name", dest="study", default=None, metavar="NAME",
                      help="the study to export (--study-name as in plot and judge)")
    what.add_argument("--check", default=None, metavar="PATH", help="validate a best.json and summarise it")
    p.add_argument("--context-len", type=int, default=None, metavar="N",
                   help="export only the entry for this measured context length")
    p.add_argument("--out", default=None, metavar="PATH", help="where to write best.json (default: stdout)")
    p.add_argument("--out-dir", default="mlruns", metavar="DIR", help="where the study's results are (default: mlruns)")
    p.set_defaults(func=run)
    return p


def describe(data: dict[str, Any]) -> str:
    """One line: per context the knobs, both phases' speed-up [interval] and verdict, or why the default stays."""
    from xlstm_tune.study.significance import fmt_interval

    prov = data.get("provenance", {})
    parts = []
    for c in data["contexts"]:
        k = c["knobs"]
        conf = c.get("confirmation") or {}
        text = f"{c['context_len']}: " + " ".join(f"{name}={k[name]}" for name in k)
        if c.get("winner") is False:
            text += f" (the default: no winner; {c.get('reason')})"
        elif conf.get("prefill") or conf.get("decode"):
            text += " (" + ", ".join(f"{p} {fmt_interval(conf[p])} {conf[p]['verdict']}"
                                     for p in ("prefill", "decode") if conf.get(p)) + ")"
        elif isinstance(sp := (c.get("metrics") or {}).get("speedup_prefill"), (int, float)):
            text += f" ({sp:.2f}x prefill, unconfirmed)"
        parts.append(text)
    return (f"schema {data['schema']}, model {prov.get('model_id')} on {prov.get('device_name')}, "
            f"study {prov.get('study_name')}; " + "; ".join(parts))


def run(args: argparse.Namespace) -> int:
    from xlstm_tune.tracking.best_export import check_best

    if args.check is not None:
        if args.context_len is not None or args.out is not None:
            raise UserError("--check takes only a path: drop --context-len/--out")
        data = check_best(args.check)
        sys.stdout.write(f"ok: {args.check}: {describe(data)}\n")
        return 0
    if args.context_len is not None and args.context_len < 1:
        raise UserError(f"--context-len must be >= 1, got {args.context_len}")
    from xlstm_tune.study.export import build_study_best, export_study
    from xlstm_tune.tracking.study_files import StudyFiles

    if args.out is None:
        data = build_study_best(StudyFiles.for_study(args.out_dir, args.study), args.context_len)
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    path, data = export_study(args.out_dir, args.study, args.out, args.context_len)
    sys.stderr.write(f"wrote {path}: {describe(data)}\n")
    return 0
