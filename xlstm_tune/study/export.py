"""best.json from a finished study's files (`python -m xlstm_tune export --study NAME`).

Reads `<out_dir>/studies/<study>/`: run_meta.json (provenance), trials.jsonl (trial numbers, MLflow run
ids) and confirm.json (the confirmation round and the chosen configuration per context length). A study
whose confirmation round has not run yet has nothing to export: re-running the study command finishes it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.tracking.best_export import build_best, export_best
from xlstm_tune.tracking.study_files import StudyFiles

CONFIRM_NAME = "confirm.json"


def confirm_path(files: StudyFiles) -> Path:
    return files.root / CONFIRM_NAME


def read_confirm(files: StudyFiles) -> dict[str, Any] | None:
    p = confirm_path(files)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def provenance(meta: Mapping[str, Any], contexts: list[dict[str, Any]]) -> dict[str, Any]:
    """best.json provenance from run_meta.json; trial number and run id of the longest context's entry."""
    dev = meta.get("device_summary") or {}
    model = meta.get("model_info") or {}
    prov = meta.get("provenance") or {}
    main = max(contexts, key=lambda c: c["context_len"]) if contexts else {}
    spec = meta.get("spec") or {}
    return {
        "device_name": dev.get("device_name") or meta.get("capabilities", {}).get("device"),
        "device": dev.get("device") or (meta.get("capabilities") or {}).get("device"),
        "os": dev.get("os") or prov.get("os"),
        "torch_version": dev.get("torch_version") or prov.get("torch_version"),
        "model_id": model.get("model_id"),
        "model_config_hash": model.get("config_hash"),
        "dtype": (spec.get("model") or {}).get("dtype"),
        "study_name": meta.get("study_name"),
        "trial_number": main.get("trial_number"),
        "mlflow_run_id": main.get("mlflow_run_id"),
        "mlflow_parent_run_id": meta.get("mlflow_parent_run_id"),
        "mlflow_experiment": meta.get("mlflow_experiment"),
        "tracking_uri": meta.get("tracking_uri"),
        "storage": meta.get("storage"),
        "git_commit": prov.get("git_commit"),
        "objectives": meta.get("objectives_effective"),
        "sampler": (spec.get("study") or {}).get("sampler"),
        "replay_source": meta.get("replay_source"),
    }


def runtime_settings(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """best.json's `runtime`: the settings the trial worker measured with (compile, dtype, threads, switches)."""
    runtime = meta.get("runtime")
    if not isinstance(runtime, Mapping):
        return None
    from xlstm_tune.runtime.settings import RuntimeSettings

    keep = {"compile", *RuntimeSettings.field_names()}
    return {k: v for k, v in runtime.items() if k in keep}


def build_study_best(files: StudyFiles, context_len: int | None = None) -> dict[str, Any]:
    """The validated best.json document for a study directory (UserError if it cannot be built)."""
    if not files.root.is_dir():
        raise UserError(f"no study directory {files.root}: check --study and --out-dir "
                        f"(studies live in <out-dir>/studies/<name>)")
    meta = files.read_run_meta()
    if meta is None:
        raise UserError(f"{files.root} has no run_meta.json: it is not a study directory written by xlstm_tune")
    confirm = read_confirm(files)
    if confirm is None or not confirm.get("contexts"):
        raise UserError(f"study {files.root.name!r} has no confirmed best configuration yet: re-run "
                        f"`python -m xlstm_tune study --study-name {files.root.name}` to finish it")
    records = {r["number"]: r for r in files.read_trials()}
    contexts = [dict(c) for c in confirm["contexts"]]
    for c in contexts:  # run ids are known once the trials are logged; fill them from the final records
        rec = records.get(c.get("trial_number"))
        if rec and rec.get("mlflow_run_id") and not c.get("mlflow_run_id"):
            c["mlflow_run_id"] = rec["mlflow_run_id"]
    if context_len is not None:
        measured = [c["context_len"] for c in contexts]
        contexts = [c for c in contexts if c["context_len"] == context_len]
        if not contexts:
            raise UserError(f"--context-len {context_len} was not measured by study {files.root.name!r}: "
                            f"use one of {measured}")
    return build_best(contexts, provenance(meta, contexts), runtime_settings(meta))


def export_study(out_dir: str | Path, study: str, out: str | Path | None = None,
                 context_len: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Write best.json for `study` to `out` (default: the study directory's best.json)."""
    files = StudyFiles.for_study(out_dir, study)
    data = build_study_best(files, context_len)
    path = Path(out) if out is not None else files.best_path
    if path.exists() and path.is_dir():
        raise UserError(f"--out {path} is a directory: pass a file path such as {path / 'best.json'}")
    try:
        return export_best(path, data), data
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}: pick a writable --out path") from None
