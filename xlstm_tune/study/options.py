"""The study command's inputs and outputs: `StudyOptions` in, `StudyResult` out (see study.runner)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StudyOptions:
    """Everything `python -m xlstm_tune study` accepts; None means "as the spec says"."""

    experiment: str | None = None
    study_name: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    sampler: str | None = None
    seed: int | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    out_dir: str = "mlruns"
    replay: str | None = None
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    compile: bool | None = None
    context_lens: list[int] | None = None
    new_tokens: int | None = None
    repeats: int | None = None
    prompt: str | None = None
    prompt_file: str | None = None
    knobs: dict[str, list[Any]] = field(default_factory=dict)
    trial_timeout: float | None = None
    objectives: list[str] | None = None
    progress: bool | None = None  # None: a live bar when stderr is a terminal, one line per trial otherwise
    early_stopping: bool | None = None  # None: as [pruning] enabled says (study.pruning)
    warm_start: list[str] = field(default_factory=list)  # earlier studies / files whose front seeds this one
    argv: list[str] | None = None
    devices: list[str] | None = None  # one trial worker process per entry (study.fleet)
    ray_address: str | None = None  # trial workers on a Ray cluster (study.fleet)
    trials_only: bool = False  # a fleet worker: run trials, leave confirmation and wrap-up to the launcher
    config: str | None = None  # runtime configuration file: settings as flags, its knobs measured first
    runtime: dict[str, Any] = field(default_factory=dict)  # threads, interop_threads, tf32_cell, ... flags
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # seconds without a heartbeat after which another process reclaims a trial
    rebuild_views: bool = False  # rewrite trials.jsonl, summary.csv and MLflow runs from the storage, measure nothing


@dataclass
class StudyResult:
    study_name: str
    completed: int
    records: list[dict[str, Any]]
    contexts: list[dict[str, Any]]
    paths: dict[str, str]
    best_path: Path | None
    new_trials: int
    summary_text: str
