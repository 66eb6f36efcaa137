"""Judge a study's saved continuations, and shape the ratings for files, tables and MLflow.

A study writes each trial's greedy continuation to ``outputs/trial_<n>.txt``. Judging is a separate,
repeatable step (``python -m xlstm_tune judge``): a judge can be swapped (builtin heuristic, Ollama,
an OpenAI-compatible server) and a study re-judged without re-running any trial. This module is the
pure part: which files are outputs, what the prompt was, one rating record per trial, and how ratings
merge into trial records. Reading the study folder and logging to MLflow is the CLI's job
(``xlstm_tune.cli.judge_cmd``), which keeps this layer free of the tracking layer above it.

A rating record is flat and JSON-ready::

    {"number": 3, "judge": "ollama:llama3.1", "judge_coherence": 7, ..., "judge_overall": 8,
     "judge_rationale": "...", "judge_valid": true, "judge_error": null, "judge_raw": "...",
     "judge_attempts": 1, "judge_latency_s": 0.8, "output_chars": 412, "prompt_known": true}
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from xlstm_tune.quality.judges import SCORE_FIELDS, Judge, JudgeResult

__all__ = [
    "OUTPUT_RE",
    "RATING_COLUMNS",
    "SUMMARY_COLUMNS",
    "find_prompt",
    "read_outputs",
    "judge_outputs",
    "ratings_jsonl",
    "ratings_csv",
    "merge_ratings",
    "rating_metrics",
]

#: Saved outputs: ``trial_<n>.txt`` (n a non-negative integer, no sign, no padding games).
OUTPUT_RE = re.compile(r"^trial_(\d+)\.txt$")

SCORE_COLUMNS = tuple(f"judge_{f}" for f in SCORE_FIELDS)
#: Columns of ratings.csv (and keys of every rating record), in order.
RATING_COLUMNS: tuple[str, ...] = (
    "number", "judge", *SCORE_COLUMNS, "judge_rationale", "judge_valid", "judge_error",
    "judge_attempts", "judge_latency_s", "output_chars", "prompt_known", "judge_raw",
)
#: The rating fields merged into trial records / summary.csv (the raw answer stays in ratings.*).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "judge", *SCORE_COLUMNS, "judge_rationale", "judge_valid", "judge_error",
)

RATINGS_JSONL = "ratings.jsonl"  # in the study folder, joined to trials by trial number
RATINGS_CSV = "ratings.csv"


def find_prompt(meta: Mapping[str, Any] | None, base_dir: Path | None = None) -> str | None:
    """The prompt a study generated from, as recorded in run_meta.json; None when not recorded.

    Looks for a string ``prompt`` at the top level, then inside nested objects (``spec``,
    ``experiment``, ... breadth first), then for a ``prompt_file`` that still exists (relative paths
    against ``base_dir``). The study layer owns run_meta.json's layout; this keeps judging working
    whichever of those places it chooses.
    """
    if not isinstance(meta, Mapping):
        return None
    queue: list[Mapping[str, Any]] = [meta]
    files: list[str] = []
    while queue:
        level: list[Mapping[str, Any]] = []
        for obj in queue:
            value = obj.get("prompt")
            if isinstance(value, str):
                return value
            pf = obj.get("prompt_file")
            if isinstance(pf, str) and pf:
                files.append(pf)
            level.extend(v for v in obj.values() if isinstance(v, Mapping))
        queue = level
    for pf in files:
        path = Path(pf)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
    return None


def read_outputs(outputs_dir: str | Path) -> dict[int, str]:
    """Trial number -> saved continuation text, for every ``trial_<n>.txt`` in ``outputs_dir``.

    Files with other names are ignored; undecodable bytes are replaced (a judge must still see the
    text a broken configuration produced). A missing directory gives an empty mapping.
    """
    d = Path(outputs_dir)
    if not d.is_dir():
        return {}
    out: dict[int, str] = {}
    for path in d.iterdir():
        m = OUTPUT_RE.match(path.name)
        if m and path.is_file():
            out[int(m.group(1))] = path.read_bytes().decode("utf-8", errors="replace")
    return dict(sorted(out.items()))


def judge_outputs(
    judge: Judge,
    prompt: str | None,
    outputs: Mapping[int, str],
    on_result: Callable[[int, JudgeResult], None] | None = None,
) -> list[dict[str, Any]]:
    """One rating record per output (sorted by trial number); never raises for a bad judge answer.

    ``prompt=None`` (not recorded) judges against an empty prompt and marks ``prompt_known`` false:
    relevance is then meaningless, and the record says so. ``on_result`` sees each result as it
    arrives (progress output for slow remote judges).
    """
    ratings: list[dict[str, Any]] = []
    for number in sorted(outputs):
        text = outputs[number]
        result = judge.judge(prompt or "", text)
        if on_result is not None:
            on_result(number, result)
        record: dict[str, Any] = {"number": int(number), "judge": judge.name, **result.to_dict()}
        record["output_chars"] = len(text)
        record["prompt_known"] = prompt is not None
        ratings.append({c: record.get(c) for c in RATING_COLUMNS})
    return ratings


def _finite(value: Any) -> Any:
    """None for NaN/inf floats (strict JSON and empty CSV cells), the value otherwise."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def ratings_jsonl(ratings: Iterable[Mapping[str, Any]]) -> str:
    """ratings.jsonl content: one strict-JSON object per line (no NaN tokens), newline-terminated."""
    lines = [
        json.dumps({k: _finite(v) for k, v in r.items()}, ensure_ascii=False, allow_nan=False,
                   separators=(",", ":"))
        for r in ratings
    ]
    return "".join(line + "\n" for line in lines)


def ratings_csv(ratings: Iterable[Mapping[str, Any]]) -> str:
    """ratings.csv content: :data:`RATING_COLUMNS`, empty cells for None, booleans as true/false."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(RATING_COLUMNS)
    for r in ratings:
        row = []
        for c in RATING_COLUMNS:
            v = _finite(r.get(c))
            row.append("" if v is None else ("true" if v is True else "false" if v is False else str(v)))
        writer.writerow(row)
    return buf.getvalue()


def merge_ratings(
    records: Iterable[Mapping[str, Any]], ratings: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Copies of ``records`` with each trial's rating fields (:data:`SUMMARY_COLUMNS`) set.

    Joined on ``number``. Judge fields from an earlier judging are dropped first, so a trial whose
    output is no longer judged does not keep a stale score.
    """
    by_number = {int(r["number"]): r for r in ratings}
    stale = set(SUMMARY_COLUMNS)
    merged: list[dict[str, Any]] = []
    for rec in records:
        new = {k: v for k, v in rec.items() if k not in stale}
        rating = by_number.get(rec.get("number")) if isinstance(rec.get("number"), int) else None
        if rating is not None:
            new.update({c: rating.get(c) for c in SUMMARY_COLUMNS})
        merged.append(new)
    return merged


def rating_metrics(rating: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics of one rating: the four scores (valid answers only) and ``judge_valid`` 1/0."""
    metrics: dict[str, float] = {"judge_valid": 1.0 if rating.get("judge_valid") else 0.0}
    if rating.get("judge_valid"):
        for c in SCORE_COLUMNS:
            v = rating.get(c)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[c] = float(v)
    return metrics
