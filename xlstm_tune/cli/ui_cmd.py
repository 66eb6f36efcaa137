"""`python -m xlstm_tune ui`: the MLflow UI on this project's tracking store (compare runs side by side).

    python -m xlstm_tune ui [--out-dir mlruns] [--tracking-uri URI] [--host 127.0.0.1] [--port 5000]

The store is the one `study` writes: --tracking-uri, else $MLFLOW_TRACKING_URI, else the sqlite store
`<out-dir>/mlflow.db`. The server binds to 127.0.0.1 unless --host says otherwise. It runs as a process
group of its own that SIGTERM or Ctrl-C stops whole, workers included (cli.server_group).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ui", help="start the MLflow UI on the study results",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="mlruns", metavar="DIR", help="where `study` wrote its results (default: mlruns)")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow store (default: sqlite in --out-dir)")
    p.add_argument("--host", default="127.0.0.1", metavar="HOST", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, metavar="PORT", help="port (default 5000)")
    p.add_argument("--print-command", action="store_true", help="print the server command instead of running it")
    p.set_defaults(func=run)
    return p


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be in 1..65535, got {port}")


def warn_if_exposed(host: str, what: str) -> None:
    if host not in LOOPBACK:
        sys.stderr.write(f"warning: {what} on {host} is reachable from other machines; it has no authentication\n")


def build_command(args: argparse.Namespace) -> list[str]:
    from xlstm_tune.tracking.mlflow_log import default_artifact_root, resolve_tracking_uri

    check_port(args.port)
    uri = resolve_tracking_uri(args.tracking_uri, args.out_dir)
    if uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking URI {uri} is already a server: open it in a browser")
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not db.is_file():
            raise UserError(f"no MLflow store at {db}: run `python -m xlstm_tune study --out-dir {args.out_dir}` first, "
                            f"or pass --tracking-uri")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
            "--default-artifact-root", default_artifact_root(args.out_dir).as_uri(),
            "--host", args.host, "--port", str(args.port)]


def run(args: argparse.Namespace) -> int:
    cmd = build_command(args)
    if args.print_command:
        sys.stdout.write(shlex.join(cmd) + "\n")
        return 0
    warn_if_exposed(args.host, "the MLflow UI")
    sys.stderr.write(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)\n")
    from xlstm_tune.cli.server_group import serve

    return serve(cmd)
