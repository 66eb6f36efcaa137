"""Check an Optuna journal file before Optuna opens it; repair a torn tail, refuse real damage.

The journal is one JSON record per line, appended under Optuna's lock. A writer killed mid-append
leaves a partial last line: Optuna reads past it silently, but its next append lands on that line, and
from then on the file no longer loads. So before a study (or the dashboard) opens the journal:

    clean                 every line a complete record, the file ends with a newline: nothing to do
    torn tail             the last line is partial: it is dropped (the rest is a consistent earlier
                          state of the log), the original is kept as `<journal>.bak[-N]`, the repaired
                          file replaces it atomically, and one line on stderr says so
    damaged               a line before the last is not a record (garbage in the middle, an old torn
                          line that later appends landed on), or the file was cut short: it lost trials
                          that `<out_dir>/studies/<study>/trials.jsonl` records. UserError, file untouched

A cut file and a torn tail look alike inside the journal; the study's own trial records tell them
apart: a kill tears at most the op being written, never a trial the study already recorded.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from xlstm_tune.atomic_files import write_bytes_atomic
from xlstm_tune.errors import UserError

_CREATE_STUDY, _CREATE_TRIAL = 0, 4  # optuna.storages.journal's JournalOperation codes
_FIX = "restore it from a backup, or start a new study with another --out-dir or --storage"


def _record(line: bytes) -> dict[str, Any] | None:
    """The journal record on `line`, or None if the line is not one."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("op_code"), int) else None


def trials_per_study(records: list[dict[str, Any]]) -> dict[str, int]:
    """Study name -> number of trials created, replaying the journal's create ops as Optuna does."""
    names: dict[int, str] = {}
    counts: dict[str, int] = {}
    for rec in records:
        if rec["op_code"] == _CREATE_STUDY and rec.get("study_name") not in names.values():
            names[len(names)] = str(rec.get("study_name"))
            counts[names[len(names) - 1]] = 0
        elif rec["op_code"] == _CREATE_TRIAL and rec.get("study_id") in names:
            counts[names[rec["study_id"]]] += 1
    return counts


def _recorded_trials(out_dir: Path, study: str) -> int:
    """1 + the highest trial number in the study's trials.jsonl (0 when it has none)."""
    path = out_dir / "studies" / study / "trials.jsonl"
    if not path.is_file():
        return 0
    highest = -1
    for line in path.read_bytes().splitlines():
        rec = _record_number(line)
        if rec is not None:
            highest = max(highest, rec)
    return highest + 1


def _record_number(line: bytes) -> int | None:
    try:
        number = json.loads(line.decode("utf-8")).get("number")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def _scan(data: bytes, path: Path) -> tuple[list[dict[str, Any]], int]:
    """(complete records, byte length they take); UserError if a line before the last is not a record."""
    records: list[dict[str, Any]] = []
    end = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # every element but the last ended in \n
        rec = _record(line.rstrip(b"\r"))
        if rec is None:
            raise UserError(f"the Optuna journal {path} is damaged: line {number} of {len(lines) - 1 + bool(lines[-1])} "
                            f"is not a journal record: {_FIX}")
        records.append(rec)
        end += len(line) + 1
    return records, end


def _backup_path(path: Path) -> Path:
    candidate, k = path.with_name(path.name + ".bak"), 2
    while candidate.exists():
        candidate, k = path.with_name(f"{path.name}.bak-{k}"), k + 1
    return candidate


def check_journal(path: str | Path, out_dir: str | Path, err: TextIO | None = None) -> bool:
    """Check (and if torn, repair) the journal at `path`; True if it was repaired. See the module docstring."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        _scan(data, path)
        return False
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    try:
        lock.acquire()  # a writer mid-append holds it: what looked torn may just be unfinished
    except OSError as exc:
        raise UserError(f"the Optuna journal {path} ends in a partial record and cannot be repaired here "
                        f"({exc.strerror or exc}): make its folder writable, or {_FIX}") from None
    try:
        data = path.read_bytes()
        records, end = _scan(data, path)
        tail = data[end:]
        if not tail:
            return False
        last = _record(tail)
        keep = data + b"\n" if last is not None else data[:end]
        if last is not None:
            records.append(last)
        for study, created in trials_per_study(records).items():
            recorded = _recorded_trials(Path(out_dir), study)
            if created < recorded:
                raise UserError(f"the Optuna journal {path} was cut short: it holds {created} trial(s) of study "
                                f"{study!r} where its trials.jsonl records {recorded}: {_FIX}")
        backup = _backup_path(path)
        shutil.copy2(path, backup)
        write_bytes_atomic(path, keep)
    finally:
        lock.release()
    what = "completed its last record's line" if last is not None else f"dropped a partial last record ({len(tail)} bytes)"
    (err or sys.stderr).write(f"repaired the Optuna journal {path}: {what}; the original is kept as {backup}\n")
    return True
