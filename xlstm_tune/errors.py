"""Errors a user can act on.

Every layer raises :class:`UserError` (or a subclass) for bad input; the CLI prints its message as one
line and exits with code 2. The message names the problem and the fix.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input: a config, a flag, a file or a device request that cannot be honoured."""


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded as it is."""


class DeviceUnavailableError(UserError):
    """The requested device (or a device feature) is not available here; we never fall back silently."""


class MemoryAbort(RuntimeError):
    """The memory watchdog's hard threshold was crossed; the running work was aborted.

    Not a UserError: callers (the study's trial worker) classify it as a memory failure.
    """


# errno -> (what happened, the fix); a full or read-only disk is the environment, not a bug of ours
_STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free some space, or pass --out-dir on a disk with room"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space, or pass --out-dir on a disk with room"),
    errno.EFBIG: ("the file grew past the size limit", "raise the file size limit (ulimit -f), or pass another --out-dir"),
    errno.EROFS: ("the file system is read-only", "pass --out-dir on a writable disk (copy the results folder there)"),
    errno.EACCES: ("permission denied", "fix the permissions, or pass a writable --out-dir"),
    errno.EPERM: ("operation not permitted", "fix the permissions, or pass a writable --out-dir"),
}
# SQLite reports the same faults as text (through sqlite3 / SQLAlchemy / MLflow exceptions)
_SQLITE_TEXT = (("database or disk is full", errno.ENOSPC), ("readonly database", errno.EROFS),
                ("unable to open database file", errno.EACCES))


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or during (cause, else context), at most 16."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 16:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def storage_fault(exc: BaseException) -> str | None:
    """One line for an exception caused by a full, read-only or forbidden disk (anywhere in its chain:
    OSError, or SQLite's wording of it under SQLAlchemy/MLflow), naming the path and the fix; else None."""
    seen = exception_chain(exc)
    for e in seen:
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            what, fix = _STORAGE_ERRNOS[e.errno]
            where = f" writing {e.filename}" if e.filename else ""
            return f"{what}{where}: {fix}"
    for e in seen:
        text = str(e).lower()
        for needle, code in _SQLITE_TEXT:
            if needle in text:
                what, fix = _STORAGE_ERRNOS[code]
                return f"{what} writing the SQLite database (the MLflow store or --storage): {fix}"
    return None
