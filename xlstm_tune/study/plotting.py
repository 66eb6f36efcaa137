"""Plots and report.md for a study, attached to its MLflow parent run (used by `study` and `plot`)."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_tune.quality.judging import RATINGS_JSONL
from xlstm_tune.tracking.mlflow_log import resolve_tracking_uri
from xlstm_tune.tracking.study_files import read_numbered_jsonl
from xlstm_tune.tracking.study_lookup import existing_study, open_study_runs

JOURNAL_NAME = "optuna.journal"
MAX_STATS_PLOTS = 64  # one figure per trial; beyond this the report says how many were left out
_STATS_HEADER = "step,dt_ms,cum_ms,inst_tok_s,avg_tok_s"


@dataclass
class PlotOutcome:
    """What :func:`make_study_plots` wrote and where it logged, with notes for what it skipped."""

    plots: list[Path]
    report: Path
    importances: dict[str, float] | None
    mlflow_run_id: str | None
    notes: list[str] = field(default_factory=list)


def _storage_for(storage: str | None, meta: dict[str, Any] | None, out_dir: Path) -> str | None:
    """The Optuna storage to read: flag > run_meta.json `storage` > the default journal, if it exists."""
    if storage:
        return storage
    if meta:
        for key in ("storage", "optuna_storage"):
            value = meta.get(key)
            if isinstance(value, str) and value:
                return value
    journal = out_dir / JOURNAL_NAME
    return str(journal) if journal.is_file() else None


def load_importances(storage: str, study_name: str) -> tuple[dict[str, float] | None, str | None, str | None]:
    """(importances, metric label, note): knob importances of the Optuna study, or None and why not.

    ``storage`` is a database URL (``sqlite:///...``) or a journal file path. For a multi-objective
    study the importances are of the objective named ``decode_tok_s`` (``study.metric_names``),
    else of the first objective. Never raises: importances are a nice-to-have at the end of a study.
    """
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "[I ...]" lines from loading
    try:
        return _load_importances(optuna, storage, study_name)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _load_importances(optuna: Any, storage: str, study_name: str) -> tuple[dict[str, float] | None, str | None, str | None]:
    from optuna.trial import TrialState

    try:
        if "://" in storage:
            db = storage[len("sqlite:///"):].split("?", 1)[0] if storage.startswith("sqlite:///") else ""
            if db and not Path(db).is_file():  # optuna would create an empty database
                return None, None, f"knob importances skipped: no Optuna database at {db}"
            store: Any = storage
        else:
            path = Path(storage)
            if not path.is_file():
                return None, None, f"knob importances skipped: no Optuna journal at {path}"
            store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        study = optuna.load_study(study_name=study_name, storage=store)
    except Exception as exc:  # noqa: BLE001 - a missing study or unreadable storage is a note, not a failure
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        return None, None, f"knob importances skipped: cannot load Optuna study {study_name!r} from {storage} ({why})"
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, None, (f"knob importances skipped: {len(complete)} complete trial(s) in the Optuna "
                            "study, at least 2 needed")
    names = list(study.metric_names or [])
    target = None
    if len(study.directions) > 1:
        idx = names.index("decode_tok_s") if "decode_tok_s" in names else 0
        label = names[idx] if idx < len(names) else f"objective {idx}"
        # PED-ANOVA (the fallback below) ranks knobs by how they reach LOW target values: negate a
        # maximised objective so "good" stays good. fANOVA does not care about the sign.
        sign = -1.0 if study.directions[idx] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        target = lambda t, i=idx, s=sign: s * t.values[i]  # noqa: E731
    else:
        label = names[0] if names else "objective"
    evaluator, how = _evaluator(optuna)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
    except Exception as exc:  # noqa: BLE001 - e.g. a storage that changed under us
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        return None, None, f"knob importances skipped: Optuna could not compute them ({why})"
    note = f"knob importances of {label}: {how}, over {len(complete)} complete trial(s)"
    if any("will be equal" in str(w.message) for w in caught):
        note += "; all equal: too few trials for Optuna to tell the knobs apart"
    return {k: float(v) for k, v in imp.items()}, label, note


def _evaluator(optuna: Any) -> tuple[Any, str]:
    """fANOVA when scikit-learn is there, else Optuna's default evaluator (PED-ANOVA in Optuna 5).

    fANOVA answers "how much of the metric's variance does each knob explain" over all trials,
    which is what a tuning report needs. PED-ANOVA measures how differently the top 10% of trials
    use a knob compared with all trials sampled so far; once a sampler has converged on the
    winning value, that knob looks unimportant (the study already uses it everywhere).
    """
    try:
        import sklearn  # noqa: F401 - Optuna's fANOVA needs it
    except ImportError:
        return None, ("Optuna's default evaluator (PED-ANOVA: how the top trials differ from the rest; "
                      "install scikit-learn for fANOVA)")
    return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA (share of the variance explained)"


def natural_key(path: Path) -> list[Any]:
    """Sort key that orders the numbers inside a name as numbers: trial_2 < trial_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _stats_csvs(outputs_dir: Path) -> tuple[list[Path], str | None]:
    """Decode-step CSVs (the `--stats-log` header) saved in outputs/, in trial order (trial_2 before
    trial_10), capped to keep the report readable."""
    found = []
    if outputs_dir.is_dir():
        for p in sorted(outputs_dir.glob("*.csv"), key=natural_key):
            try:
                with p.open(encoding="utf-8") as fh:
                    header = fh.readline().strip().replace(" ", "")
            except (OSError, UnicodeDecodeError):
                continue
            if header == _STATS_HEADER:
                found.append(p)
    if len(found) > MAX_STATS_PLOTS:
        return found[:MAX_STATS_PLOTS], (f"decode-step plots drawn for the first {MAX_STATS_PLOTS} of "
                                         f"{len(found)} stats CSVs in outputs/")
    return found, None


def make_study_plots(
    out_dir: str | Path,
    study_name: str,
    tracking_uri: str | None = None,
    storage: str | None = None,
    default_record: dict[str, Any] | None = None,
) -> PlotOutcome:
    """Plots + report.md for one study, logged to its MLflow parent run if found.

    Raises UserError for an unknown study or a bad tracking URI; everything optional (Optuna storage,
    MLflow run, ratings) degrades to a note in the outcome and in the report.
    """
    from xlstm_tune.quality.judging import merge_ratings
    from xlstm_tune.quality.plots import plot_all
    from xlstm_tune.quality.report import write_report

    sf = existing_study(out_dir, study_name)
    uri = resolve_tracking_uri(tracking_uri, out_dir)
    notes: list[str] = []
    records = sf.read_trials()
    if not records:
        notes.append("trials.jsonl has no trial records yet")
    ratings = read_numbered_jsonl(sf.root / RATINGS_JSONL)
    if ratings:
        records = merge_ratings(records, ratings)

    importances = label = None
    store = _storage_for(storage, sf.read_run_meta(), Path(out_dir))
    if store is None:
        notes.append(f"knob importances skipped: no Optuna storage (no {Path(out_dir) / JOURNAL_NAME}; "
                     "pass --storage URL)")
    else:
        importances, label, note = load_importances(store, study_name)
        if note:
            notes.append(note)
    stats, note = _stats_csvs(sf.outputs_dir)
    if note:
        notes.append(note)

    plots = plot_all(records, sf.plots_dir, importances, stats, importance_metric=label)
    runs = open_study_runs(uri, study_name)
    run_id = runs.tracker.parent_run_id if runs.tracker is not None else None
    if run_id is None:
        notes.append(f"MLflow: plots not logged ({runs.note})")
    report = write_report(sf.root, records, sf.best_path, plots, default_record, notes=notes,
                          time_split=(sf.read_run_meta() or {}).get("time_split"))
    if runs.tracker is not None:
        runs.tracker.log_parent_artifacts(plots, artifact_path="plots")
        runs.tracker.log_parent_artifacts([report])
    return PlotOutcome(plots, report, importances, run_id, notes)
