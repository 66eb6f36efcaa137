"""A throw-away PostgreSQL server for tests: Debian's postgresql binaries, a temporary data directory,
127.0.0.1 on a free port only, stopped (and its directory removed) at teardown whether the test passed.

PostgreSQL refuses to run as root, so as root the server runs as the unprivileged `postgres` user (the
Debian package creates it) in a data directory owned by that user; otherwise it runs as the caller.
`.ci/install-test-services` installs the package where its binaries are missing.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def find_pg_bin() -> Path | None:
    """The newest Debian postgresql bin directory, or the one holding `initdb` on PATH."""
    dirs = sorted(glob.glob(PG_BIN_GLOB), key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").is_file():
            return Path(d)
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Start a server; yields a `postgresql://` URL of an empty database `xt` on 127.0.0.1."""
    user = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="xt-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if user:
        pw = pwd.getpwnam(user)
        os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chown(sock, pw.pw_uid, pw.pw_gid)
    port = _free_port()
    run = lambda *argv: subprocess.run(_as_user(user, [str(bin_dir / argv[0]), *argv[1:]]),  # noqa: E731
                                       check=True, capture_output=True, text=True, timeout=120)
    started = False
    try:
        run("initdb", "-D", str(data), "-U", "xt", "--auth=trust", "-E", "UTF8", "--no-sync")
        run("pg_ctl", "-D", str(data), "-w", "-t", "60", "-l", str(root / "server.log"), "-o",
            f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} "
            f"-c fsync=off -c max_connections=200", "start")
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "xt", "xt")
        yield f"postgresql://xt@127.0.0.1:{port}/xt"
    finally:
        if started:
            subprocess.run(_as_user(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                           "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
