"""Where a study's trials live: an Optuna journal file under the output directory, or any database URL.

    (default)                      <out_dir>/optuna.journal      JournalStorage(JournalFileBackend)
    --storage sqlite:///PATH.db    RDBStorage (also postgresql://, mysql://, ... with their drivers)
    --storage PATH.journal         a journal file elsewhere (also `journal:PATH`)

A storage that cannot be opened is a one-line UserError before anything else is touched. One process
runs a given study at a time: `StudyLock` holds an exclusive `flock` on `<study dir>/.lock`, which the
kernel drops when the process dies however it dies, so a SIGKILLed study can be resumed at once and a
second concurrent run of the same study is refused instead of corrupting it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xlstm_tune.errors import UserError
from xlstm_tune.study.journal_check import check_journal

JOURNAL_NAME = "optuna.journal"
_DB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql", "cockroachdb")


def default_journal_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / JOURNAL_NAME


def _is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith((".journal", ".log", ".jsonl"))


def describe_storage(url: str | None, out_dir: str | Path) -> str:
    """The storage as a user types it (for messages, run_meta.json and `dashboard`)."""
    if url is None:
        return str(default_journal_path(out_dir))
    return url


def check_storage_url(url: str | None) -> None:
    """Reject a URL we cannot even try (a typo'd scheme) before anything is opened."""
    if url is None:
        return
    if not url.strip():
        raise UserError("--storage is empty: pass a database URL (sqlite:///PATH.db) or a .journal path")
    if _is_journal(url):
        return
    scheme = urlparse(url).scheme.lower().split("+", 1)[0]
    if scheme not in _DB_SCHEMES:
        raise UserError(f"--storage {url!r}: unsupported scheme {scheme or '(none)'!r}: use sqlite:///PATH.db, "
                        f"postgresql://..., mysql://... or a PATH.journal file")


def open_storage(url: str | None, out_dir: str | Path) -> Any:
    """An Optuna storage object for `url` (None: the default journal in `out_dir`); UserError if unreachable."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    check_storage_url(url)
    if url is None or _is_journal(url):
        path = default_journal_path(out_dir) if url is None else Path(url.removeprefix("journal:"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_journal(path, out_dir)  # a torn tail is repaired, real damage refused (journal_check)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise UserError(f"cannot open the Optuna journal {path}: {exc.strerror or exc}: "
                            f"pick a writable --out-dir or --storage path") from None
    scheme = urlparse(url).scheme.lower().split("+", 1)[0]
    kwargs: dict[str, Any] = {}
    if scheme != "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except ImportError as exc:
        raise UserError(f"--storage {_redact(url)}: the database driver is not installed ({exc.name or exc}): "
                        f"pip install it, or use sqlite:///PATH.db") from None
    except Exception as exc:  # sqlalchemy OperationalError, ArgumentError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"cannot open --storage {_redact(url)} ({type(exc).__name__}: {first}): "
                        f"check that the database is reachable and the URL is right") from None


def _redact(url: str) -> str:
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@")
    return url


class StudyLock:
    """Exclusive lock on a study directory for the life of this process (see the module docstring)."""

    def __init__(self, directory: str | Path, study_name: str) -> None:
        self.path = Path(directory) / ".lock"
        self.study_name = study_name
        self._fd: int | None = None

    def acquire(self) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - non-POSIX: no protection, but no failure either
            pass
        except OSError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise UserError(f"study {self.study_name!r} is being run by another process (pid {holder}): "
                            f"wait for it to finish, or use another --study-name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "StudyLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
