"""Where a study's trials live: an Optuna journal file under the output directory, or any database URL.

    (default)                      <out_dir>/optuna.journal      JournalStorage(JournalFileBackend)
    --storage sqlite:///PATH.db    RDBStorage
    --storage postgresql://...     RDBStorage through psycopg 3 (`postgresql+psycopg://`); the shared
                                   database for studies run by many processes on many hosts
    --storage PATH.journal         a journal file elsewhere (also `journal:PATH`); processes of one host

A storage that cannot be opened is a one-line UserError before anything else is touched. Any number of
processes may run one study at once (see study.slots and study.liveness): `StorageMutex` serialises the
short step in which a process counts the study's trials and asks for the next one (a PostgreSQL advisory
lock, MySQL's GET_LOCK, or an flock on a file beside a journal or sqlite database), and `FolderLock`
serialises writes of a study folder's files by processes that share an `--out-dir`.
"""
from __future__ import annotations

import hashlib
import os
import warnings
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


def journal_path(url: str | None, out_dir: str | Path) -> Path | None:
    """The journal file a storage URL names (None for a database URL)."""
    if url is None:
        return default_journal_path(out_dir)
    if _is_journal(url):
        return Path(url.removeprefix("journal:"))
    return None


def _scheme(url: str) -> str:
    return urlparse(url).scheme.lower().split("+", 1)[0]


def sqlalchemy_url(url: str) -> str:
    """The URL SQLAlchemy gets: `postgresql://` and `postgres://` go through psycopg 3, the declared driver."""
    p = urlparse(url)
    if p.scheme.lower() in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def describe_storage(url: str | None, out_dir: str | Path) -> str:
    """The storage as a user types it (for messages, run_meta.json and `dashboard`)."""
    if url is None:
        return str(default_journal_path(out_dir))
    return redact(url)


def check_storage_url(url: str | None) -> None:
    """Reject a URL we cannot even try (a typo'd scheme) before anything is opened."""
    if url is None:
        return
    if not url.strip():
        raise UserError("--storage is empty: pass a database URL (sqlite:///PATH.db) or a .journal path")
    if _is_journal(url):
        return
    scheme = _scheme(url)
    if scheme not in _DB_SCHEMES:
        raise UserError(f"--storage {url!r}: unsupported scheme {scheme or '(none)'!r}: use sqlite:///PATH.db, "
                        f"postgresql://..., mysql://... or a PATH.journal file")


def open_storage(url: str | None, out_dir: str | Path, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None, stale_trial_callback: Any = None) -> Any:
    """An Optuna storage object for `url` (None: the default journal in `out_dir`); UserError if unreachable.

    RDB storages get Optuna's heartbeat (`heartbeat_interval`, `grace_period`, and the callback that
    re-queues a trial whose process died); the journal has none (study.liveness supplies one)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    check_storage_url(url)
    path = journal_path(url, out_dir)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            check_journal(path, out_dir)  # a torn tail is repaired, real damage refused (journal_check)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise UserError(f"cannot open the Optuna journal {path}: {exc.strerror or exc}: "
                            f"pick a writable --out-dir or --storage path") from None
    assert url is not None
    kwargs: dict[str, Any] = {}
    if _scheme(url) != "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    if heartbeat_interval is not None:
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      heartbeat_stale_trial_callback=stale_trial_callback)
    try:
        return _rdb_storage(sqlalchemy_url(url), kwargs)
    except ImportError as exc:
        raise UserError(f"--storage {redact(url)}: the database driver is not installed ({exc.name or exc}): "
                        f"pip install it, or use sqlite:///PATH.db") from None
    except Exception as exc:  # sqlalchemy OperationalError, ArgumentError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"cannot open --storage {redact(url)} ({type(exc).__name__}: {first}): "
                        f"check that the database is reachable and the URL is right") from None


def _rdb_storage(url: str, kwargs: dict[str, Any]) -> Any:
    """RDBStorage, tolerating a schema being created by another process starting at the same moment."""
    import optuna

    for attempt in range(3):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0; we rely on them
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # noqa: BLE001
            text = str(exc).lower()
            if attempt == 2 or not ("already exists" in text or "duplicate key" in text or "unique" in text):
                raise
    raise AssertionError("unreachable")


def redact(url: str) -> str:
    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@")
    return url


def storage_identity(url: str | None, out_dir: str | Path) -> str:
    """What names the storage in run_meta.json: the journal's absolute path, or the redacted URL."""
    path = journal_path(url, out_dir)
    if path is not None:
        return f"journal:{path.resolve()}"
    assert url is not None
    if _scheme(url) == "sqlite":
        db = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else url
        return f"sqlite:///{Path(db).resolve()}" if db and db != ":memory:" else redact(url)
    return redact(url)


class _FileLock:
    """A blocking exclusive flock on a file (dropped by the kernel when the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "_FileLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class FolderLock(_FileLock):
    """Serialises writes of one study folder's files (`<study dir>/.lock`) by processes sharing it."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__(Path(directory) / ".lock")


def _lock_key(study_name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"xlstm_tune:{study_name}".encode()).digest()[:8], "big", signed=True)


class StorageMutex:
    """Mutual exclusion over one study in one storage, across processes and hosts (see the module doc)."""

    def __init__(self, url: str | None, out_dir: str | Path, study_name: str) -> None:
        self.url, self.study_name = url, study_name
        path = journal_path(url, out_dir)
        if path is None and url is not None and _scheme(url) == "sqlite":
            db = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
            path = Path(db) if db and db != ":memory:" else None
        self._file = _FileLock(path.with_name(path.name + f".{study_name}.lock")) if path is not None else None
        self._engine: Any = None
        self._conn: Any = None

    def _db(self) -> Any:
        if self._engine is None:
            import sqlalchemy

            assert self.url is not None
            self._engine = sqlalchemy.create_engine(sqlalchemy_url(self.url), poolclass=sqlalchemy.pool.NullPool)
        return self._engine

    def __enter__(self) -> "StorageMutex":
        if self._file is not None:
            self._file.__enter__()
            return self
        import sqlalchemy

        assert self.url is not None
        scheme = _scheme(self.url)
        self._conn = self._db().connect()
        if scheme in ("postgresql", "postgres", "cockroachdb"):
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _lock_key(self.study_name)})
        elif scheme in ("mysql", "mariadb"):
            self._conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": f"xlstm_tune:{self.study_name}"[:64]})
        else:
            self._conn.close()
            self._conn = None
            raise UserError(f"--storage {redact(self.url)}: a shared study needs PostgreSQL, MySQL, sqlite or a "
                            f"journal file")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.__exit__(*exc)
            return
        if self._conn is not None:
            try:
                self._conn.close()  # the session's advisory lock goes with its connection
            finally:
                self._conn = None

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
