"""`python -m xlstm_tune dashboard`: optuna-dashboard on the study storage (history, Pareto front, importances).

    python -m xlstm_tune dashboard [--out-dir mlruns] [--storage URL] [--host 127.0.0.1] [--port 8080]

The storage is the one `study` uses: --storage, else the journal `<out-dir>/optuna.journal`. The server
binds to 127.0.0.1 unless --host says otherwise. It runs as a process group of its own that SIGTERM or
Ctrl-C stops whole (cli.server_group).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from xlstm_tune.cli.ui_cmd import check_port, warn_if_exposed
from xlstm_tune.errors import UserError


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("dashboard", help="start optuna-dashboard on the study storage",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="mlruns", metavar="DIR", help="where `study` wrote its results (default: mlruns)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage URL or .journal file (default: <out-dir>/optuna.journal)")
    p.add_argument("--host", default="127.0.0.1", metavar="HOST", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, metavar="PORT", help="port (default 8080)")
    p.add_argument("--print-command", action="store_true", help="print the equivalent optuna-dashboard command and exit")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from xlstm_tune.study.storage import check_storage_url, default_journal_path, open_storage

    check_port(args.port)
    check_storage_url(args.storage)
    if args.storage is None:
        journal = default_journal_path(args.out_dir)
        if not journal.is_file():
            raise UserError(f"no Optuna storage at {journal}: run `python -m xlstm_tune study --out-dir {args.out_dir}` "
                            f"first, or pass --storage")
        target = str(journal)
    else:
        target = args.storage
        path = Path(target.removeprefix("journal:"))
        if target.endswith((".journal", ".log")) and not path.is_file():
            raise UserError(f"no Optuna journal at {path}: check --storage")
    if args.print_command:
        sys.stdout.write(shlex.join(["optuna-dashboard", target, "--host", args.host, "--port", str(args.port)]) + "\n")
        return 0
    open_storage(args.storage, args.out_dir)  # unreachable or damaged: one line here, before serving

    from xlstm_tune.cli.server_group import serve

    warn_if_exposed(args.host, "optuna-dashboard")
    sys.stderr.write(f"optuna-dashboard on http://{args.host}:{args.port} (Ctrl-C to stop)\n")
    return serve([sys.executable, "-c", "import sys; from xlstm_tune.cli.dashboard_cmd import serve_storage; "
                  "serve_storage(*sys.argv[1:])", args.storage or "", str(args.out_dir), args.host, str(args.port)])


def serve_storage(storage: str, out_dir: str, host: str, port: str) -> None:
    """The server process: optuna-dashboard on the storage `study` would open (same URL rules)."""
    from optuna_dashboard import run_server

    from xlstm_tune.study.storage import open_storage

    run_server(open_storage(storage or None, out_dir), host=host, port=int(port))
