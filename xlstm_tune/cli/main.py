"""`python -m xlstm_tune {study,run,bench,judge,plot,export,ui,dashboard}`.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and `run(args) -> int`.
Bad input of any kind ends here as one line on stderr and exit code 2, never a traceback; so does a
full, read-only or forbidden disk (the line names the path and the fix). The memory watchdog's hard
limit is one line and exit code 1. Ctrl-C is one line and exit code 130; further Ctrl-Cs are ignored
while the interrupted command cleans up (SIGTERM or SIGKILL still stop it).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from xlstm_tune.errors import MemoryAbort, UserError, storage_fault

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


# Their errors reach us as exceptions and become one line; their own logging would print the same
# failure again as dozens of lines of SQL and tracebacks first.
_QUIET_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic", "sqlalchemy")


def _interrupt_once(signum: int, frame: object) -> None:
    """First Ctrl-C: interrupt the command. Later ones are ignored so its cleanup (finally blocks, the
    interpreter's exit hooks) runs to the end instead of breaking with a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "0")  # never run an op on the CPU behind the user's back
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread() and previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt_once)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        return _fail(args.command, f"error: {exc}", 2)
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted", 130)
    except MemoryAbort as exc:
        return _fail(args.command, f"stopped by the memory watchdog: {exc}", 1)
    except Exception as exc:
        line = storage_fault(exc)
        if line is None:
            raise
        return _fail(args.command, f"error: {line}", 2)
    finally:
        if signal.getsignal(signal.SIGINT) is _interrupt_once:  # not interrupted: hand Ctrl-C back
            signal.signal(signal.SIGINT, previous)


def _fail(command: str, message: str, code: int) -> int:
    sys.stderr.write(f"xlstm_tune {command}: {' '.join(message.split())}\n")
    return code
