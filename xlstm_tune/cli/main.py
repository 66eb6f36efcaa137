"""`python -m xlstm_tune {study,run,bench,judge,plot,export,ui,dashboard}`.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`.
Bad input of any kind ends here as one line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from xlstm_tune.errors import UserError

# subcommand -> module under xlstm_tune.cli
SUBCOMMANDS = {
    "study": "study_cmd",
    "run": "run_cmd",
    "bench": "bench_cmd",
    "judge": "judge_cmd",
    "plot": "plot_cmd",
    "export": "export_cmd",
    "ui": "ui_cmd",
    "dashboard": "dashboard_cmd",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line and exit code 2 (its own default is a usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="xlstm_tune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"xlstm_tune.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"xlstm_tune.cli.{module_name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "0")  # never run an op on the CPU behind the user's back
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        sys.stderr.write(f"xlstm_tune {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"xlstm_tune {args.command}: interrupted\n")
        return 130
