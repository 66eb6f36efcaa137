"""Atomic file writes: a temporary file beside the target, fsync, rename, fsync of the directory.

Readers see the old file or the new one, whole, never half of it; used by every layer that writes
results (best.json, summary.csv, reports), so it sits beside `errors` at the bottom of the package.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (Windows), so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data`: a reader (or a crash at any instant) sees the old file or the new one.

    A write that fails (a full disk, a read-only folder) removes its temporary file and leaves the
    target as it was; the OSError propagates so the caller can say which path and why.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        exc.filename = str(p)  # the user knows the target, not our temporary name
        raise
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:
            exc.filename = str(p)  # a failed write() names no file: say which one
        raise
    _fsync_dir(p.parent)
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
