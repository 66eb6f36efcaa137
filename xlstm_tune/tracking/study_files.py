"""The files of one study: `<out_dir>/studies/<study>/` (docs/DESIGN.md §4 "Where results go").

    run_meta.json   what was run (spec, model, device, versions, the storage), rewritten atomically
    trials.jsonl    one JSON object per line per finished trial: a view of the Optuna storage (the source
                    of truth, study.views), rewritten atomically
    summary.csv     the same records as a table, the seed system's columns first, rewritten atomically
    best.json       the exported winner (tracking.best_export)
    outputs/        per-trial continuation texts and other outputs
    plots/          figures

A study can be killed at any instant (timeout, OOM killer, Ctrl-C), so nothing here is ever left
half-written: whole files go through temp + fsync + rename (`append_trial` grows a file one complete,
fsync'd line at a time). A reader tolerates the one partial line a kill can leave in an appended file.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.atomic_files import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# The seed system's columns, in its order, then the knobs it lacked, then everything else sorted.
SEED_COLUMNS = (
    "number", "state", "backend", "workers", "heads_per_band", "chunk_size",
    "prefill_tok_s", "decode_tok_s", "prefill_s", "decode_s",
)
EXTRA_KNOB_COLUMNS = ("t_inner", "streams", "decode_mode", "context_len")
LEADING_COLUMNS = SEED_COLUMNS + EXTRA_KNOB_COLUMNS


def check_study_name(name: str) -> str:
    """A study name becomes a directory name and an MLflow filter value: keep it a plain single name."""
    if not name or not name.strip():
        raise UserError("study name is empty: pass --study-name NAME")
    bad = [c for c in ("/", "\\", "'", '"', "\n", "\r", "\0") if c in name]
    if bad or name in (".", "..") or name != name.strip():
        raise UserError(
            f"study name {name!r} cannot be used as a directory name: use letters, digits, '-', '_' or '.'"
        )
    return name


def json_safe(value: Any) -> Any:
    """Copy of `value` that strict JSON accepts: NaN/inf become null, tuples become lists, paths strings.

    Python's json writes NaN as a bare token that jq, browsers and pandas' strict readers reject.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return json_safe(value.item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _trial_number(record: Mapping[str, Any]) -> int:
    number = record.get("number")
    if isinstance(number, bool) or not isinstance(number, int):
        raise ValueError(f"a trial record needs an integer 'number', got {number!r}")
    return number


def read_numbered_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file keyed by an integer `number` (trials, ratings): the last line per
    number wins, sorted by number.

    Lines that are not a complete JSON object with an integer `number` (a partial line from a killed
    process) are skipped with a warning, never fatal: a study must be resumable.
    """
    path = Path(path)
    if not path.is_file():
        return []
    by_number: dict[int, dict[str, Any]] = {}
    skipped = 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
            number = _trial_number(record) if isinstance(record, dict) else None
        except (UnicodeDecodeError, ValueError):
            number = None
        if number is None:
            skipped += 1
            continue
        by_number.pop(number, None)  # re-insert so dict order follows the last write
        by_number[number] = record
    if skipped:
        log.warning("%s: skipped %d incomplete or unreadable line(s)", path, skipped)
    return [by_number[n] for n in sorted(by_number)]


def _encode_line(record: Mapping[str, Any]) -> bytes:
    _trial_number(record)
    text = json.dumps(json_safe(record), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (text + "\n").encode("utf-8")


class StudyFiles:
    """Paths and readers/writers for one study directory; directories are created on first write."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def for_study(cls, out_dir: str | Path, study_name: str) -> "StudyFiles":
        """The directory `<out_dir>/studies/<study_name>/` (the name is checked, not sanitised)."""
        return cls(Path(out_dir) / "studies" / check_study_name(study_name))

    # ---- paths ---------------------------------------------------------------------------------
    @property
    def run_meta_path(self) -> Path:
        return self.root / "run_meta.json"

    @property
    def trials_path(self) -> Path:
        return self.root / "trials.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.root / "summary.csv"

    @property
    def best_path(self) -> Path:
        return self.root / "best.json"

    @property
    def outputs_dir(self) -> Path:
        return self.root / "outputs"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def ensure_dirs(self) -> "StudyFiles":
        """Create the study directory with outputs/ and plots/."""
        for d in (self.root, self.outputs_dir, self.plots_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # ---- run_meta.json -------------------------------------------------------------------------
    def write_run_meta(self, meta: Mapping[str, Any]) -> Path:
        """Atomically (re)write run_meta.json."""
        return write_json_atomic(self.run_meta_path, json_safe(meta))

    def read_run_meta(self) -> dict[str, Any] | None:
        """run_meta.json, or None if the study has not written one yet."""
        if not self.run_meta_path.is_file():
            return None
        try:
            data = json.loads(self.run_meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(
                f"{self.run_meta_path} is not valid JSON ({exc}); delete it or start a new --study-name"
            ) from None
        if not isinstance(data, dict):
            raise UserError(f"{self.run_meta_path} is not a JSON object; delete it or start a new --study-name")
        return data

    # ---- trials.jsonl --------------------------------------------------------------------------
    def append_trial(self, record: Mapping[str, Any]) -> None:
        """Append one trial as one line with a single write(), then fsync.

        If a killed writer left a partial last line, a newline is written first so the new record starts
        on its own line (the partial one is then skipped by `read_trials`). A write that fails (a full
        disk) is rolled back to the previous size before the error propagates.
        """
        data = _encode_line(record)
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.trials_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size > 0:
                with open(self.trials_path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        data = b"\n" + data
            view = memoryview(data)
            try:
                while view:  # one write() for a regular file; the loop only guards a short write
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            except OSError as exc:  # a full disk: take back the part that got written, never a torn line
                os.ftruncate(fd, size)
                exc.filename = exc.filename or str(self.trials_path)
                raise
        finally:
            os.close(fd)

    def read_trials(self) -> list[dict[str, Any]]:
        """All trial records, one per trial number (the last line wins), sorted by number."""
        return read_numbered_jsonl(self.trials_path)

    def rewrite_trials(self, records: Iterable[Mapping[str, Any]]) -> Path:
        """Atomically replace trials.jsonl with `records` (resume reconciliation)."""
        text = b"".join(_encode_line(r) for r in records).decode("utf-8")
        return write_text_atomic(self.trials_path, text)

    # ---- summary.csv ---------------------------------------------------------------------------
    def write_summary_csv(self, records: Iterable[Mapping[str, Any]]) -> Path:
        """Atomically write summary.csv: leading columns fixed, then the union of other keys sorted.

        Missing cells and None/NaN are empty; lists and dicts are JSON-encoded in their cell.
        """
        rows = list(records)
        seen: set[str] = set()
        for r in rows:
            seen.update(str(k) for k in r)
        columns = list(LEADING_COLUMNS) + sorted(seen - set(LEADING_COLUMNS))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in rows:
            flat = {str(k): v for k, v in r.items()}
            writer.writerow([_csv_cell(flat.get(c)) for c in columns])
        return write_text_atomic(self.summary_path, buf.getvalue())


def _csv_cell(value: Any) -> str:
    value = json_safe(value)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)
