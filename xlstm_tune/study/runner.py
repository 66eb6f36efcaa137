"""The study loop: sample knobs with Optuna, measure them in an isolated worker, record everything.

    result = run_study(StudyOptions(experiment="experiments/quickstart.toml"))

One call, in this order:

1. **Plan** (no side effects): read the spec, probe the device and the model, resolve the search space,
   the objectives and the sampler, check the prompt, the storage URL and the tracking URI, and check that
   an existing study of the same name was measured the same way. Any problem is a UserError here, before
   a file is created or a database opened.
2. **Open**: the Optuna storage (a journal under `--out-dir` by default), an exclusive lock on the study
   directory, the MLflow experiment and the study's parent run.
3. **Reconcile** a study left by a killed process: a trial left RUNNING whose result reached trials.jsonl
   is finished from that record (nothing is measured twice); one without a result is marked FAIL
   (`interrupted`) and its settings are re-queued. Every finished trial gets its trials.jsonl line and
   its MLflow child run if it lacks them.
4. **Trials** until `n_trials` trials are COMPLETE in total (so re-running a finished study does nothing):
   ask -> check the combination -> measure (or answer from an identical configuration, or from the
   replay record) -> append to trials.jsonl (fsync) -> Optuna user attrs + tell -> MLflow child run ->
   summary.csv. The worker process loads the model once; any crash fails just that trial.
5. **Confirm** the top candidates against the default configuration, interleaved (study.confirm), then
   write best.json, the final summary.csv, the parent run's artifacts, and print the summary table.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from xlstm_tune import __version__
from xlstm_tune.errors import UserError, storage_fault
from xlstm_tune.runtime.best_file import write_json_atomic
from xlstm_tune.study import confirm as confirm_mod
from xlstm_tune.study.export import confirm_path, read_confirm
from xlstm_tune.study.faults import faults_from_env
from xlstm_tune.study.records import (
    build_record,
    is_feasible,
    measured,
    mlflow_payload,
    user_attrs,
)
from xlstm_tune.study.report import render
from xlstm_tune.study.space import SearchSpace, knob_key
from xlstm_tune.study.spec import (
    apply_device_overrides,
    apply_overrides,
    load_spec,
    parse_spec,
)
from xlstm_tune.study.storage import StudyLock, check_storage_url, describe_storage, open_storage
from xlstm_tune.study.worker import TrialWorker, WorkerFailure

MAX_UNRUNNABLE_IN_A_ROW = 200  # sampled combinations that could not run (invalid / not recorded) in a row


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
    argv: list[str] | None = None
    devices: list[str] | None = None  # one trial worker process per entry (study.fleet)
    ray_address: str | None = None  # trial workers on a Ray cluster (study.fleet)
    trials_only: bool = False  # a fleet worker: run trials, leave confirmation and wrap-up to the launcher
    config: str | None = None  # runtime configuration file: settings as flags, its knobs measured first
    runtime: dict[str, Any] = field(default_factory=dict)  # threads, interop_threads, tf32_cell, ... flags


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


def effective_objectives(objectives: Sequence[str], space: SearchSpace) -> tuple[list[str], list[str]]:
    """Objectives some searched knob can move; an objective no knob moves is recorded, not optimised."""
    moved = [o for o in objectives if space.moved_by(o)]
    notes = []
    for o in objectives:
        if o not in moved:
            notes.append(f"{o} is recorded but not optimised: no knob with more than one value in the space moves it "
                         f"({'decode_mode' if o.startswith('decode') else 'the prefill knobs'} fixed)")
    if not moved:
        moved = [objectives[0]]
        notes.append(f"nothing in the space varies: the study measures one configuration ({objectives[0]})")
    return moved, notes


def _check_tracking_server(uri: str) -> None:
    p = urlparse(uri)
    if p.scheme not in ("http", "https"):
        return
    host = p.hostname or "localhost"
    port = p.port or (443 if p.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise UserError(f"MLflow tracking server {uri} is unreachable ({exc.strerror or exc}): start it "
                        f"(python -m xlstm_tune ui) or leave --tracking-uri out for the local sqlite store") from None


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


class _Progress:
    """A tqdm bar on a terminal (best so far as postfix); one plain line per trial otherwise."""

    def __init__(self, enabled: bool | None, total: int, initial: int, name: str, err: TextIO) -> None:
        self.err = err
        self.live = enabled if enabled is not None else bool(getattr(err, "isatty", lambda: False)())
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc=f"study {name}", unit="trial",
                            file=err, dynamic_ncols=True, leave=True)

    def running(self, number: int, knobs: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"trial {number} {knobs['backend']}/c{knobs['chunk_size']}")

    def done(self, rec: Mapping[str, Any], completed: int, best: str) -> None:
        if self.bar is not None:
            if rec["state"] == "COMPLETE":
                self.bar.update(1)
            self.bar.set_postfix_str(best, refresh=True)
            return
        if rec["state"] == "COMPLETE":
            what = f"prefill {rec.get('prefill_tok_s', float('nan')):,.0f} tok/s, decode {rec.get('decode_tok_s', float('nan')):,.0f} tok/s"
            if not rec.get("feasible"):
                what += f", INFEASIBLE (fidelity rel_err {rec.get('fidelity_rel_err', float('nan')):.1e})"
            if rec.get("duplicate_of") is not None:
                what += f" (same configuration as #{rec['duplicate_of']})"
        else:
            what = f"{rec.get('failure_reason')}: {rec.get('error') or ''}"[:160]
        self.err.write(f"[trial {rec['number']}] {rec['state']} {what} | {completed} complete | {best}\n")
        self.err.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WorkerEvaluator:
    """Measures trials in an isolated worker process (study.worker)."""

    kind = "worker"

    def __init__(self, setup: dict[str, Any], log_dir: Path, trial_timeout_s: float, start_timeout_s: float) -> None:
        self.worker = TrialWorker(setup, log_dir, start_timeout_s)
        self.trial_timeout_s = trial_timeout_s

    @property
    def info(self) -> dict[str, Any] | None:
        return self.worker.info

    def start(self) -> dict[str, Any]:
        return self.worker.ensure()

    def evaluate(self, number: int, knobs: Mapping[str, Any], fault: str | None = None) -> dict[str, Any]:
        reply = self.worker.request({"cmd": "trial", "number": number, "knobs": dict(knobs), "fault": fault},
                                    self.trial_timeout_s, f"trial {number}")
        reply["state"] = "COMPLETE"
        return reply

    def confirm(self, configs: list[dict[str, Any]], rounds: int, repeats: int) -> dict[str, Any]:
        timeout = self.trial_timeout_s * max(1, 2 * len(configs)) * rounds
        return self.worker.request({"cmd": "confirm", "configs": configs, "rounds": rounds, "repeats": repeats},
                                   timeout, "the confirmation round")

    def close(self) -> None:
        self.worker.close()


class StudyRun:
    """One invocation of the study command (see the module docstring)."""

    def __init__(self, opts: StudyOptions, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.out_dir = Path(opts.out_dir)
        self.records: dict[int, dict[str, Any]] = {}
        self.by_key: dict[str, dict[str, Any]] = {}
        self.run_ids: dict[int, str] = {}
        self.notes: list[str] = []
        self.new_trials = 0
        self.tracker: Any = None
        self._mlflow_warned = False

    # ================================================================================================
    # 1. plan: validation only, nothing is written
    # ================================================================================================
    def plan(self) -> None:
        from xlstm_tune.bench.workload import PromptSource, describe_model, device_capabilities
        from xlstm_tune.study.replay import (
            load_source,
            source_capabilities,
            source_model_info,
            source_spec_doc,
        )
        from xlstm_tune.study.samplers import check_sampler
        from xlstm_tune.tracking.mlflow_log import resolve_tracking_uri
        from xlstm_tune.tracking.study_files import StudyFiles, check_study_name

        o = self.opts
        self.src = load_source(o.replay, self.out_dir) if o.replay else None
        if o.experiment is not None:
            spec = load_spec(o.experiment)
        elif self.src is not None and source_spec_doc(self.src) is not None:
            spec = parse_spec(source_spec_doc(self.src), f"replay of {self.src.trials_path}")  # type: ignore[arg-type]
        else:
            spec = load_spec(None)
        if self.src is not None:
            caps = source_capabilities(self.src)
        else:
            caps = device_capabilities(o.device or spec.model["device"])
        spec = apply_device_overrides(spec, caps["device_type"])
        self.notes += [n for n in spec.notes]
        spec = apply_overrides(
            spec, study_name=o.study_name, n_trials=o.n_trials, sampler=o.sampler, seed=o.seed, timeout=o.timeout,
            trial_timeout=o.trial_timeout, model=o.model, device=o.device, dtype=o.dtype, compile=o.compile,
            context_lens=o.context_lens, new_tokens=o.new_tokens, repeats=o.repeats, objectives=o.objectives,
            prompt=o.prompt, prompt_file=o.prompt_file, knobs=o.knobs, config=o.config, runtime=o.runtime)
        if self.src is not None and o.study_name is None:
            spec.study["name"] = f"{self.src.study_name}-replay-{spec.study['sampler']}-s{spec.study['seed']}"
        self.name = check_study_name(spec.name)
        self.model_info = source_model_info(self.src) if self.src is not None else describe_model(spec.model["name"])
        self.caps = caps
        self.spec = spec
        self.space = SearchSpace.resolve(spec, self.model_info, caps)
        self.default_key = knob_key(self.space.canonical(self.space.default_knobs()))
        self.enqueued = [self._enqueue_params(n, e) for n, e in enumerate(spec.study["enqueue"], 1)]
        self.notes += self.space.notes
        self.objectives, obj_notes = effective_objectives(spec.objectives, self.space)
        self.notes += obj_notes
        self.sampler_name = spec.study["sampler"]
        check_sampler(self.sampler_name, len(self.objectives))
        if self.sampler_name == "grid":
            self.space.grid()  # raises if too large
        # prompt: a spec's prompt_file is relative to the spec file, a flag's to the working directory
        prompt_file = spec.workload["prompt_file"]
        if prompt_file and o.prompt_file is None and o.experiment and not Path(prompt_file).is_absolute():
            prompt_file = str(Path(o.experiment).parent / prompt_file)
        self.prompt = PromptSource.from_args(spec.workload["prompt"], prompt_file, seed=spec.workload["prompt_seed"])
        self.tracking_uri = resolve_tracking_uri(o.tracking_uri, self.out_dir)
        _check_tracking_server(self.tracking_uri)
        check_storage_url(o.storage)
        self.faults = faults_from_env()
        self.files = StudyFiles.for_study(self.out_dir, self.name)
        self.identity = {"spec": spec.measurement_identity(), "objectives_effective": self.objectives,
                         "device": caps.get("device"),
                         "replay_source": str(self.src.trials_path.resolve()) if self.src else None}
        meta = self.files.read_run_meta()
        self.previous_meta = meta
        if meta is not None and meta.get("identity") is not None and meta["identity"] != self.identity:
            diff = _first_difference(meta["identity"], self.identity)
            raise UserError(f"study {self.name!r} was run with different settings ({diff}): use the same settings "
                            f"to resume it, or pass a new --study-name")

    def _enqueue_params(self, n: int, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Sampler params for one [study] enqueue entry, or a UserError saying why it cannot be measured."""
        knobs = dict(self.space.default_knobs(), **entry)
        why = self.space.check(knobs)
        params = None if why else self.space.params_for(knobs)
        if params is None:
            reason = why or "its values are not in [space] on this device"
            raise UserError(f"[study] enqueue entry {n} {dict(entry)} cannot be a trial ({reason}): "
                            f"change it or widen [space]")
        return params

    # ================================================================================================
    # 2. open
    # ================================================================================================
    def _open(self) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage = open_storage(self.opts.storage, self.out_dir)
        self.lock = StudyLock(self.files.root, self.name).acquire()
        try:
            self._open_study()
        except BaseException:
            self.lock.release()
            raise

    def _open_study(self) -> None:
        import optuna

        from xlstm_tune.study.samplers import make_sampler
        from xlstm_tune.tracking.mlflow_log import StudyTracker, comparison_columns, default_artifact_root

        self.files.ensure_dirs()
        sampler = make_sampler(self.sampler_name, seed=self.spec.study["seed"], n_objectives=len(self.objectives),
                               n_trials=self.spec.study["n_trials"],
                               grid=self.space.grid() if self.sampler_name == "grid" else None,
                               options=self.spec.sampler)
        directions = ["maximize"] * len(self.objectives)
        try:
            self.study = optuna.create_study(storage=self.storage, study_name=self.name, directions=directions,
                                             sampler=sampler, load_if_exists=True)
        except Exception as exc:
            raise UserError(f"cannot create or load study {self.name!r} in {self.storage_label}: {exc}") from None
        if len(self.study.directions) != len(directions):
            raise UserError(f"study {self.name!r} in {self.storage_label} has {len(self.study.directions)} objective(s), "
                            f"this run has {len(directions)} ({self.objectives}): use a new --study-name")
        if self.study.metric_names != self.objectives:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self.study.set_metric_names(list(self.objectives))  # the dashboard and plots name the axes
        self.experiment_name = f"xlstm_tune/{self.name}"
        try:
            self.tracker = StudyTracker(self.tracking_uri, self.experiment_name, default_artifact_root(self.out_dir))
            params: dict[str, Any] = {}
            _flatten("", self.spec.to_dict(), params)
            params = {k: v for k, v in params.items() if k != "source"}
            self.parent_run_id = self.tracker.start_parent(
                self.name, params=params,
                tags={"xlstm_tune.version": __version__, "objectives": ",".join(self.objectives),
                      "sampler": self.sampler_name, "device": self.caps.get("device", ""),
                      "model": self.spec.model["name"], "replay": str(self.src is not None).lower(),
                      "mlflow.note.content": f"xlstm_tune study {self.name}: {self.spec.source}"})
            self.comparison_route = self.tracker.save_comparison_view(
                *comparison_columns(self.spec.context_lens, list(self.space.dims)))
        except UserError:
            raise
        except Exception as exc:
            if storage_fault(exc):
                raise  # a read-only or full disk: the CLI names it in one line
            raise UserError(f"cannot use the MLflow store {self.tracking_uri} ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0][:200]}): check --tracking-uri") from None

    @property
    def storage_label(self) -> str:
        return describe_storage(self.opts.storage, self.out_dir)

    def _make_evaluator(self) -> Any:
        from xlstm_tune.study.replay import ReplayEvaluator

        if self.src is not None:
            return ReplayEvaluator(self.src)
        s = self.spec
        setup = {
            "model": s.model["name"], "device": self.caps["device"], "dtype": s.model["dtype"],
            "compile": s.model["compile"], "model_seed": s.model["seed"],
            "context_lens": s.context_lens, "new_tokens": s.workload["new_tokens"],
            "decode_context_len": s.workload["decode_context_len"],
            "batch_size": s.workload["batch_size"],
            "prompt_text": self.prompt.text, "prompt_origin": self.prompt.origin, "prompt_seed": self.prompt.seed,
            "bench": dict(s.bench),
            "runtime": dict(s.runtime),
            "fidelity": {"rel_tol": s.rel_tol(), "min_greedy_agreement": s.fidelity["min_greedy_agreement"],
                         "prompt_len": s.fidelity["prompt_len"], "decode_steps": s.fidelity["decode_steps"]},
            "reference_path": str(self.files.root / "reference" / "reference.pt"),
            "outputs_dir": str(self.files.outputs_dir),
            "quality": {"perplexity": s.quality["perplexity"]},
        }
        return WorkerEvaluator(setup, self.files.root / "workers", s.trial["timeout_s"], s.trial["worker_start_timeout_s"])

    # ================================================================================================
    # records, Optuna and MLflow
    # ================================================================================================
    @property
    def device_summary(self) -> dict[str, Any]:
        info = getattr(self, "evaluator", None) and self.evaluator.info
        if info and info.get("device_summary"):
            return dict(info["device_summary"])
        if self.previous_meta and self.previous_meta.get("device_summary"):
            return dict(self.previous_meta["device_summary"])
        return {"device": self.caps.get("device", "")}

    def _completed(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def _remember(self, rec: dict[str, Any]) -> None:
        self.records[rec["number"]] = rec
        if measured(rec) and rec.get("key"):
            self.by_key.setdefault(rec["key"], rec)

    def _set_attrs(self, trial_id: int, rec: Mapping[str, Any]) -> None:
        """The record as Optuna user attributes, and the fidelity constraint of a COMPLETE trial."""
        import optuna

        from xlstm_tune.study.samplers import set_constraint

        trial = optuna.trial.Trial(self.study, trial_id)
        for k, v in user_attrs(rec).items():
            trial.set_user_attr(k, v)
        if rec["state"] == "COMPLETE":
            set_constraint(trial, rec.get("constraint", 1.0))

    def _tell(self, trial: Any, rec: Mapping[str, Any]) -> None:
        """Tell Optuna the record's outcome (tolerating GridSampler's stop() outside optimize())."""
        from optuna.trial import TrialState

        kwargs: dict[str, Any]
        if rec["state"] == "COMPLETE":
            kwargs = {"values": list(rec["objective_values"])}
        else:
            kwargs = {"state": TrialState.FAIL if rec["state"] == "FAIL" else TrialState.PRUNED}
        try:
            self.study.tell(trial, **kwargs)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):
                raise
            self.grid_done = True

    def _error_file(self, rec: Mapping[str, Any]) -> Path | None:
        if rec["state"] == "COMPLETE" or not (rec.get("error") or rec.get("traceback")):
            return None
        path = self.files.outputs_dir / f"trial_{rec['number']}_error.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"trial {rec['number']}: {rec['state']} ({rec.get('failure_reason')})\n"
                        f"{rec.get('error_type') or ''}: {rec.get('error') or ''}\n\n{rec.get('traceback') or ''}\n",
                        encoding="utf-8")
        return path

    def _log_mlflow(self, rec: dict[str, Any]) -> None:
        params, metrics, tags = mlflow_payload(rec, device=self.device_summary, sampler=self.sampler_name)
        artifacts = [self.files.root / p for p in (rec.get("outputs") or {}).values()]
        err_file = self._error_file(rec)
        if err_file is not None:
            artifacts.append(err_file)
        try:
            run_id = self.tracker.log_trial(rec["number"], params=params, metrics=metrics, tags=tags,
                                            artifacts=artifacts,
                                            status="FINISHED" if rec["state"] == "COMPLETE" else "FAILED",
                                            started_at=rec.get("started_at"), finished_at=rec.get("finished_at"))
            self.run_ids[rec["number"]] = run_id
            best = self._best_so_far()
            if best:
                self.tracker.log_parent_metrics(best, step=rec["number"])
        except Exception as exc:  # the study's own record is safe; MLflow is filled in on the next run
            if storage_fault(exc):
                raise  # a full or read-only disk: stop the study (the CLI says so in one line)
            if not self._mlflow_warned:
                self.err.write(f"warning: MLflow logging failed ({type(exc).__name__}: {exc}); "
                               f"the trial is recorded in trials.jsonl and will be logged on the next run\n")
                self._mlflow_warned = True

    def _best_so_far(self) -> dict[str, float]:
        best: dict[str, float] = {}
        for rec in self.records.values():
            if not is_feasible(rec):
                continue
            for k in ("prefill_tok_s", "decode_tok_s"):
                v = rec.get(k)
                if isinstance(v, (int, float)) and math.isfinite(v) and v > best.get(f"best_{k}", -1.0):
                    best[f"best_{k}"] = float(v)
        return best

    def _best_text(self) -> str:
        parts = []
        for k, label in (("prefill_tok_s", "prefill"), ("decode_tok_s", "decode")):
            cands = [r for r in self.records.values() if is_feasible(r) and isinstance(r.get(k), (int, float))]
            if cands:
                r = max(cands, key=lambda r: r[k])
                parts.append(f"best {label} {r[k]:,.0f} tok/s (#{r['number']})")
        return ", ".join(parts) or "no feasible trial yet"

    def _summary_csv(self) -> None:
        rows = []
        for n in sorted(self.records):
            rec = dict(self.records[n])
            if n in self.run_ids:
                rec["mlflow_run_id"] = self.run_ids[n]
            rec.pop("traceback", None)
            rec["sampled_params"] = rec.pop("params", None)  # the sampler's raw values; the knob columns ran
            rows.append(rec)
        self.files.write_summary_csv(rows)

    def _finish(self, trial: Any, rec: dict[str, Any]) -> None:
        """The durable sequence for one finished trial (see the module docstring, step 4)."""
        self.files.append_trial(rec)
        self._remember(rec)
        self._set_attrs(trial._trial_id, rec)
        self._tell(trial, rec)
        self._log_mlflow(rec)
        self._summary_csv()
        self.new_trials += 1
        if not getattr(self, "_meta_has_worker", False) and getattr(self.evaluator, "info", None):
            self._meta_has_worker = True
            self._write_meta()  # now with the device summary and prompt the worker reported

    # ================================================================================================
    # 3. reconcile
    # ================================================================================================
    def _reconcile(self) -> None:
        import optuna
        from optuna.trial import TrialState

        for rec in self.files.read_trials():
            self._remember(rec)
        on_file = dict(self.records)
        for t in self.study.get_trials(deepcopy=False):
            rec = on_file.get(t.number)
            if t.state == TrialState.RUNNING and self.opts.trials_only:
                continue  # another worker's trial; the launcher reconciles what dead workers left
            if t.state == TrialState.RUNNING:
                trial = optuna.trial.Trial(self.study, t._trial_id)
                if rec is not None and rec.get("state") in ("COMPLETE", "FAIL", "PRUNED"):
                    self._set_attrs(t._trial_id, rec)  # measured and recorded, never told: finish it
                    self._tell(trial, rec)
                    self.notes.append(f"trial {t.number} was measured before the last run stopped: finished from its record")
                else:
                    rec = self._interrupted_record(t)
                    self.files.append_trial(rec)
                    self._remember(rec)
                    self._set_attrs(t._trial_id, rec)
                    self._tell(trial, rec)
                    self._requeue(t)
            elif t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED) and rec is None:
                stored = t.user_attrs.get("record")
                if isinstance(stored, dict) and stored.get("number") == t.number:
                    rec = dict(stored)
                else:  # failed by Optuna itself (e.g. Ctrl-C inside tell): treat as interrupted
                    rec = self._interrupted_record(t)
                    rec["state"] = t.state.name
                    if t.state == TrialState.FAIL:
                        self._requeue(t)
                self.files.append_trial(rec)
                self._remember(rec)
        # MLflow: every finished trial has exactly one finished child run
        finished = {n for n, r in self.records.items() if r.get("state") in ("COMPLETE", "FAIL", "PRUNED")}
        try:
            runs = self.tracker.find_trial_runs()
        except Exception:  # noqa: BLE001
            runs = {}
        for n, run in runs.items():
            if run.info.status in ("FINISHED", "FAILED"):
                self.run_ids[n] = run.info.run_id
        for n in sorted(finished - set(self.run_ids)):
            self._log_mlflow(self.records[n])
        if self.records:
            self._summary_csv()

    def _interrupted_record(self, t: Any) -> dict[str, Any]:
        knobs = self.space.knobs_from_params(t.params)
        try:
            knobs = self.space.canonical(knobs)
        except Exception:  # noqa: BLE001 - a partial param set; keep what we have
            pass
        return build_record(
            t.number, state="FAIL", params=t.params, knobs=knobs, compile=self.spec.model["compile"],
            key=knob_key(knobs), failure_reason="interrupted",
            error="the study process stopped while this trial ran; its settings were re-queued",
            error_type="Interrupted", objectives=self.objectives, context_lens=self.spec.context_lens,
        )

    def _requeue(self, t: Any) -> None:
        """Enqueue a trial's params again unless an identical one is already waiting."""
        from optuna.trial import TrialState

        if not t.params:
            return
        for w in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if w.system_attrs.get("fixed_params") == t.params:
                return
        self.study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})

    # ================================================================================================
    # 4. trials
    # ================================================================================================
    def _run_trial(self) -> dict[str, Any]:
        trial = self.study.ask()
        number = trial.number
        params = self.space.suggest(trial)
        raw = self.space.knobs_from_params(params)
        extra: dict[str, Any] = {"sampler": self.sampler_name,
                                 "requeued_from": trial.user_attrs.get("requeued_from"),
                                 "is_default": None,
                                 "baseline": True if trial.user_attrs.get("baseline") else None,
                                 "started_at": _now(), **_ran_by()}
        common = dict(params=params, compile=self.spec.model["compile"], objectives=self.objectives,
                      context_lens=self.spec.context_lens)
        reason = self.space.check(raw)
        if reason is not None:
            rec = build_record(number, state="PRUNED", knobs=raw, key=knob_key(raw),
                               failure_reason="invalid_combination", error=reason, extra=extra, **common)
            self._finish(trial, rec)
            return rec
        knobs = self.space.canonical(raw)
        key = knob_key(knobs)
        if key == self.default_key:
            extra["is_default"] = True  # the default configuration (quality.report reads this)
        self.progress.running(number, knobs)
        t0 = time.perf_counter()
        try:
            if key in self.by_key:
                src = self.by_key[key]
                outcome: dict[str, Any] | None = _outcome_from_record(src)
                outcome["duplicate_of"] = src["number"]  # type: ignore[index]
            else:
                outcome = self.evaluator.evaluate(number, knobs, self.faults.get(number))
        except WorkerFailure as f:
            rec = build_record(number, state="FAIL", knobs=knobs, key=key, failure_reason=f.reason, error=f.message,
                               error_type=f.error_type, traceback=f.detail,
                               extra=dict(extra, duration_s=time.perf_counter() - t0, finished_at=_now()), **common)
            self._finish(trial, rec)
            return rec
        except (KeyboardInterrupt, UserError) as exc:
            # Ctrl-C, or a replacement worker that cannot start: not this configuration's fault
            why = ("interrupted by the user (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
                   else f"the trial worker could not start: {exc}")
            rec = build_record(number, state="FAIL", knobs=knobs, key=key, failure_reason="interrupted",
                               error=f"{why}; the settings were re-queued", error_type=type(exc).__name__,
                               extra=extra, **common)
            self._finish(trial, rec)
            self._requeue(self.study._storage.get_trial(trial._trial_id))
            raise
        if outcome is None:  # replay: this configuration was never measured
            rec = build_record(number, state="PRUNED", knobs=knobs, key=key, failure_reason="not_recorded",
                               error="not in the replayed record", extra=extra, **common)
            self._finish(trial, rec)
            return rec
        extra.update(finished_at=_now())
        self._judge(outcome)
        if outcome.get("duration_s") is None:
            outcome["duration_s"] = time.perf_counter() - t0
        outputs = outcome.get("outputs") or {}
        outcome["outputs"] = {k: os.path.relpath(v, self.files.root) for k, v in outputs.items()}
        rec = build_record(number, state="COMPLETE", knobs=knobs, key=key, outcome=outcome, extra=extra, **common)
        values = rec.get("objective_values") or []
        if not values or not all(isinstance(v, float) and math.isfinite(v) for v in values):
            rec = build_record(number, state="FAIL", knobs=knobs, key=key, outcome=outcome, failure_reason="error",
                               error=f"no finite figure for objective(s) {self.objectives}", extra=extra, **common)
        self._finish(trial, rec)
        return rec

    def _judge(self, outcome: dict[str, Any]) -> None:
        """Score the trial's saved continuation with the configured judge (scores go into the record)."""
        kind = self.spec.quality["judge"]
        path = (outcome.get("outputs") or {}).get("continuation")
        if kind == "none" or not path or "judge_overall" in (outcome.get("quality") or {}):
            return
        from xlstm_tune.quality.judges import make_judge

        if getattr(self, "_judge_impl", None) is None:
            self._judge_impl = make_judge(kind, self.spec.quality["judge_url"], self.spec.quality["judge_model"])
        text = Path(path).read_text(encoding="utf-8", errors="replace")  # as the worker wrote it
        result = self._judge_impl.judge(self._prompt_text() or "", text)
        scores = {k: v for k, v in result.to_dict(prefix="judge_").items() if k != "judge_raw"}
        outcome["quality"] = {**(outcome.get("quality") or {}), **scores}

    def _loop(self) -> None:
        target = int(self.spec.study["n_trials"])
        timeout = self.spec.study["timeout_s"]
        t_start = time.monotonic()
        self.grid_done = False
        completed = self._completed()
        if completed < target and self.evaluator.kind == "worker":
            self.evaluator.start()  # load the model before the first trial: a model that cannot load fails here
        self.progress = _Progress(self.opts.progress, target, completed, self.name, self.err)
        unrunnable = 0
        try:
            while completed < target:
                if timeout is not None and time.monotonic() - t_start > timeout:
                    self.notes.append(f"stopped after the study timeout of {timeout:g} s with {completed} complete trials")
                    break
                if self.grid_done:
                    self.notes.append("the grid is exhausted: every grid point has been tried")
                    break
                rec = self._run_trial()
                if rec["state"] == "COMPLETE":
                    completed = self._completed()  # the study's total: other processes may share it
                    unrunnable = 0
                elif rec["state"] == "PRUNED":
                    unrunnable += 1
                    if unrunnable >= MAX_UNRUNNABLE_IN_A_ROW:
                        self.notes.append(f"stopped: {unrunnable} sampled combinations in a row could not run "
                                          f"({rec.get('failure_reason')})")
                        break
                self.progress.done(rec, completed, self._best_text())
        finally:
            self.progress.close()

    # ================================================================================================
    # 5. confirm, export, summary
    # ================================================================================================
    def _default_entry(self) -> dict[str, Any]:
        knobs = self.space.canonical(self.space.default_knobs())
        key = knob_key(knobs)
        trials = sorted(n for n, r in self.records.items() if r.get("key") == key and r.get("state") == "COMPLETE")
        return {"key": key, "knobs": knobs, "trials": trials}

    def _confirm(self) -> dict[str, Any] | None:
        c = self.spec.confirm
        lens = self.spec.context_lens
        mode = confirm_mod.selection_mode(self.objectives)
        default = self._default_entry()
        records = [self.records[n] for n in sorted(self.records)]
        cands = confirm_mod.select_candidates(records, confirm_mod.criteria(self.objectives, lens), c["top_k"],
                                              c["max_candidates"], default["key"])
        replay = self.src is not None
        sig = confirm_mod.signature(default["key"], cands, c["rounds"], c["repeats"], rule=c) + f";mode={mode};replay={replay}"
        existing = read_confirm(self.files)
        if existing is not None and existing.get("signature") == sig:
            return existing
        if replay:
            summary = confirm_mod.replay_round(self.evaluator.records_by_key(), default, cands, lens, rule=c)
        else:
            configs = [{"key": e["key"], "knobs": e["knobs"]} for e in [default, *cands]]
            self.err.write(f"Confirmation round: {len(cands)} candidate(s) against the default, "
                           f"{c['rounds']} interleaved round(s)...\n")
            self.err.flush()
            raw = None
            for attempt in (1, 2):
                try:
                    raw = self.evaluator.confirm(configs, c["rounds"], c["repeats"])
                    break
                except WorkerFailure as f:
                    self.notes.append(f"confirmation round attempt {attempt} failed ({f.reason}: {f.message})")
            if raw is None:
                return None
            summary = confirm_mod.summarize_round(raw, default, cands, lens, rule=c)
        base = summary["configs"][0]
        if mode == "balanced" and (base.get("error") or not base.get("decode")):
            mode = "prefill"
        chosen = confirm_mod.choose_best(summary, lens, mode)
        contexts = confirm_mod.best_contexts(summary, chosen, self.records, mode)
        data = {"signature": sig, "mode": mode, "replay": replay, "rounds": c["rounds"], "repeats": c["repeats"],
                "time": _now(), "summary": summary, "contexts": contexts}
        write_json_atomic(confirm_path(self.files), data)
        self._apply_confirm(data)
        return data

    def _apply_confirm(self, data: Mapping[str, Any]) -> None:
        """Confirmed figures and speed-ups onto the confirmed trials' records and MLflow runs."""
        lens = self.spec.context_lens
        for e in data["summary"]["configs"]:
            extra: dict[str, Any] = {"confirmed": True, "confirm_role": e["role"]}
            for n in lens:
                s = e["prefill"].get(str(n))
                if s:
                    extra[f"confirm_prefill_tok_s_ctx{n}"] = s["median"]
                if e["speedup_prefill"].get(str(n)) is not None:
                    extra[f"speedup_prefill_ctx{n}"] = e["speedup_prefill"][str(n)]
            if e.get("decode"):
                extra["confirm_decode_tok_s"] = e["decode"]["median"]
            if e.get("speedup_decode") is not None:
                extra["speedup_decode"] = e["speedup_decode"]
            pre = [v for v in e["speedup_prefill"].values() if v]
            extra["speedup_vs_default"] = {
                "prefill_tok_s": math.exp(sum(math.log(v) for v in pre) / len(pre)) if pre else None,
                "decode_tok_s": e.get("speedup_decode")}
            for n in e.get("trials", []):
                if n in self.records:
                    self.records[n].update(extra)
                    run_id = self.run_ids.get(n)
                    if run_id:
                        try:
                            from mlflow.entities import Metric

                            now = int(time.time() * 1000)
                            self.tracker.client.log_batch(run_id, metrics=[
                                Metric(k, float(v), now, 0) for k, v in extra.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)])
                            self.tracker.client.set_tag(run_id, "confirmed", "true")
                        except Exception:  # noqa: BLE001 - the files hold it either way
                            pass

    def _final_files(self) -> None:
        for n, rec in self.records.items():
            if n in self.run_ids:
                rec["mlflow_run_id"] = self.run_ids[n]
        self.files.rewrite_trials([self.records[n] for n in sorted(self.records)])
        self._summary_csv()

    def _write_meta(self, final: bool = False) -> None:
        from xlstm_tune.tracking.provenance import git_commit, host_info, now_iso

        prev = self.previous_meta or {}
        if not hasattr(self, "_sessions"):
            self._sessions = list(prev.get("sessions") or []) + [{
                "started_at": now_iso(), "pid": os.getpid(), "argv": self.opts.argv,
                "n_trials": self.spec.study["n_trials"], "sampler": self.sampler_name,
                "seed": self.spec.study["seed"], "timeout_s": self.spec.study["timeout_s"]}]
        sessions = self._sessions
        import optuna

        meta = {
            "schema": "xlstm_tune.run_meta/1",
            "study_name": self.name,
            "identity": self.identity,
            "spec": self.spec.to_dict(),
            "objectives": self.spec.objectives,
            "objectives_effective": self.objectives,
            "notes": self.notes,
            "space": self.space.describe(),
            "model_info": self.model_info,
            "capabilities": self.caps,
            "device_summary": self.device_summary,
            "runtime": self._runtime_in_force(),
            "prompt": self._prompt_text(),
            "prompt_source": self.prompt.describe(),
            "storage": self.storage_label,
            "tracking_uri": self.tracking_uri,
            "mlflow_experiment": self.experiment_name,
            "mlflow_parent_run_id": self.parent_run_id,
            "replay_source": str(self.src.trials_path) if self.src is not None else None,
            "paths": self.paths(),
            "provenance": {**host_info(), "git_commit": git_commit(Path(__file__).resolve().parent),
                           "xlstm_tune_version": __version__, "optuna_version": optuna.__version__,
                           "mlflow_version": _version("mlflow")},
            "created_at": prev.get("created_at") or now_iso(),
            "updated_at": now_iso(),
            "finished": final,
            "sessions": sessions,
        }
        self.files.write_run_meta(meta)

    def _runtime_in_force(self) -> dict[str, Any] | None:
        """The worker's settings (compile, dtype, threads, CUDA switches) as it measured with them."""
        info = getattr(self, "evaluator", None) and self.evaluator.info
        if info and info.get("runtime"):
            return dict(info["runtime"])
        return (self.previous_meta or {}).get("runtime")

    def _prompt_text(self) -> str | None:
        """The text the saved continuations follow (the decode prompt, decoded by the model's tokenizer)."""
        info = getattr(self, "evaluator", None) and self.evaluator.info
        if info and info.get("decode_prompt_text") is not None:
            return info["decode_prompt_text"]
        if self.previous_meta and isinstance(self.previous_meta.get("prompt"), str):
            return self.previous_meta["prompt"]
        return self.prompt.text

    def paths(self) -> dict[str, str]:
        return {
            "study dir": str(self.files.root),
            "trials": str(self.files.trials_path),
            "summary": str(self.files.summary_path),
            "best.json": str(self.files.best_path),
            "run_meta": str(self.files.run_meta_path),
            "outputs": str(self.files.outputs_dir),
            "report": str(self.files.root / "report.md"),
            "plots": str(self.files.plots_dir),
            "Optuna storage": self.storage_label,
            "MLflow store": self.tracking_uri,
            "MLflow experiment": getattr(self, "experiment_name", f"xlstm_tune/{self.name}"),
        }

    # ================================================================================================
    def run(self) -> StudyResult:
        self.plan()
        self._open()
        self.evaluator = self._make_evaluator()
        status = "FAILED"
        try:
            self._reconcile()
            self._write_meta()
            if not self.study.trials and self.sampler_name == "grid" and self.enqueued:
                self.notes.append("[study] enqueue is not used with the grid sampler: it measures every configuration")
            elif not self.study.trials:
                params = self.space.params_for(self.space.default_knobs())
                if params is not None:
                    self.study.enqueue_trial(params, user_attrs={"baseline": True})
                else:
                    self.notes.append("the default configuration is outside the search space: it is measured in the "
                                      "confirmation round only")
                for params in self.enqueued:  # a fresh study only: a resumed one has them in its storage
                    self.study.enqueue_trial(params, user_attrs={"enqueued": True})
            if self.opts.devices or self.opts.ray_address:
                from xlstm_tune.study.fleet import run_fleet

                before = len(self.records)
                try:
                    self.fleet_report = run_fleet(self)
                finally:  # every worker has stopped: their trials, and whatever one left RUNNING
                    self._reconcile()
                    self.new_trials += len(self.records) - before
            self._loop()
            if self.opts.trials_only:
                self._final_files()
                self._write_meta()
                return StudyResult(self.name, self._completed(), [self.records[n] for n in sorted(self.records)],
                                   [], self.paths(), None, self.new_trials, "")
            data = self._confirm()
            contexts = list(data["contexts"]) if data else []
            best_path = None
            if contexts:
                for ctx in contexts:
                    ctx["mlflow_run_id"] = self.run_ids.get(ctx.get("trial_number")) or ctx.get("mlflow_run_id")
                self._final_files()
                self._write_meta(final=True)
                best_path = self._export_best(data)
            else:
                self._final_files()
                self._write_meta(final=True)
            self._parent_wrapup(contexts)
            self._plots_and_report(contexts)
            status = "FINISHED"
            text = self._render(contexts, data)
            self.out.write(text + "\n")
            self.out.flush()
            return StudyResult(self.name, self._completed(), [self.records[n] for n in sorted(self.records)],
                               contexts, self.paths(), best_path, self.new_trials, text)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                self.evaluator.close()
            finally:
                if self.tracker is not None and self.tracker.parent_run_id is not None \
                        and not self.opts.trials_only:  # a fleet's parent run is the launcher's to end
                    try:
                        self.tracker.end_parent(status)
                    except Exception:  # noqa: BLE001
                        pass
                self.lock.release()

    def _export_best(self, data: Mapping[str, Any]) -> Path | None:
        from xlstm_tune.study.export import build_study_best
        from xlstm_tune.tracking.best_export import export_best

        best = build_study_best(self.files)
        current = None
        if self.files.best_path.is_file():
            import json

            try:
                current = json.loads(self.files.best_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                current = None
        if current is not None and _same_best(current, best):
            return self.files.best_path  # nothing changed: keep the file (and its time) as it is
        return export_best(self.files.best_path, best)

    def _parent_wrapup(self, contexts: list[dict[str, Any]]) -> None:
        metrics: dict[str, Any] = {"completed_trials": self._completed(), "trials_total": len(self.records)}
        metrics.update(self._best_so_far())
        for c in contexts:
            m = c["metrics"]
            if m.get("speedup_prefill") is not None:
                metrics[f"best_speedup_prefill_ctx{c['context_len']}"] = m["speedup_prefill"]
            if m.get("speedup_decode") is not None:
                metrics["best_speedup_decode"] = m["speedup_decode"]
        try:
            self.tracker.log_parent_metrics(metrics, step=len(self.records))
            arts = [p for p in (self.files.run_meta_path, self.files.trials_path, self.files.summary_path,
                                self.files.best_path, confirm_path(self.files)) if p.is_file()]
            self.tracker.log_parent_artifacts(arts)
        except Exception as exc:  # noqa: BLE001
            if storage_fault(exc):
                raise
            self.err.write(f"warning: MLflow parent run update failed: {exc}\n")

    def _plots_and_report(self, contexts: list[dict[str, Any]]) -> None:
        """plots/ and report.md in the study folder, attached to the parent run; never fails the study."""
        from xlstm_tune.study.plotting import make_study_plots

        default = next((r for r in self.records.values() if r.get("is_default")), None)
        try:
            outcome = make_study_plots(self.out_dir, self.name, self.opts.tracking_uri, self.opts.storage, default)
            if outcome.notes:
                self.notes.extend(n for n in outcome.notes if not n.startswith("MLflow:"))
        except Exception as exc:  # noqa: BLE001 - a plotting problem must not cost the measured study
            if storage_fault(exc):
                raise
            self.err.write(f"warning: plots/report not written: {exc}\n")

    def _render(self, contexts: list[dict[str, Any]], data: Mapping[str, Any] | None) -> str:
        default = data["summary"]["configs"][0] if data else None  # its knobs are the canonical ones
        if data is None:
            note = None
        elif data.get("replay"):
            note = "from the replayed record, not re-measured"
        else:
            note = f"confirmed: {data['rounds']} interleaved round(s) against the default"
        reason = None
        if not contexts:
            reason = ("no configuration passed the fidelity check in the confirmation round" if data
                      else "no confirmation round (no worker result)")
        hints = [
            "",
            f"Compare runs:   python -m xlstm_tune ui --out-dir {self.out_dir}" + (
                f" --tracking-uri {self.opts.tracking_uri}" if self.opts.tracking_uri else ""),
        ]
        if getattr(self, "comparison_route", None):
            hints.append(f"                then open http://127.0.0.1:5000/{self.comparison_route} (the trials side by side)")
        hints += [
            f"Study history:  python -m xlstm_tune dashboard --out-dir {self.out_dir}" + (
                f" --storage {self.opts.storage}" if self.opts.storage else ""),
        ]
        if contexts:
            hints.append(f"Run with it:    python -m xlstm_tune run --best {self.files.best_path}")
        return render({
            "study": self.name,
            "headline": f"{self.new_trials} new trial(s) this run, {self._completed()} complete of "
                        f"{self.spec.study['n_trials']} wanted; objectives {', '.join(self.objectives)}",
            "records": [self.records[n] for n in sorted(self.records)],
            "contexts": contexts,
            "default": default,
            "confirmation": data["summary"] if data else None,
            "confirm_note": note,
            "no_best_reason": reason,
            "notes": self.notes + [n for n in (busy_note(self.records.values(), self.spec.bench["max_other_cpu"]),) if n],
            "paths": self.paths(),
            "hints": hints,
        })


def busy_note(records: Any, max_other_cpu: float) -> str | None:
    """The summary's warning when trials were measured on a busy machine (bench/load.py), else None."""
    busy = sorted(r["number"] for r in records if r.get("busy_machine"))
    if not busy:
        return None
    return (f"warning: {len(busy)} trial(s) were measured on a busy machine (other processes took more than "
            f"{max_other_cpu:.0%} of the CPUs, also when re-measured): trials {busy[:10]}"
            f"{' ...' if len(busy) > 10 else ''}; their figures are flagged busy_machine: re-run on an idle "
            f"machine to trust them")


def _outcome_from_record(rec: Mapping[str, Any]) -> dict[str, Any]:
    metrics = {k: v for k, v in rec.items()
               if k.startswith(("prefill_", "decode_", "compile_s")) and not isinstance(v, (dict, list))}
    fidelity = {k.removeprefix("fidelity_"): v for k, v in rec.items() if k.startswith("fidelity_")}
    quality = {k: v for k, v in rec.items() if k.startswith(QUALITY_PREFIXES)}
    return {"state": "COMPLETE", "metrics": metrics, "fidelity": fidelity, "quality": quality,
            "flags": rec.get("flags") or [], "duration_s": 0.0}


QUALITY_PREFIXES = ("distinct_", "repetition_rate", "perplexity", "continuation_tokens", "judge_")


def _same_best(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    strip = lambda d: {**d, "provenance": {k: v for k, v in d.get("provenance", {}).items() if k != "time"}}  # noqa: E731
    return strip(a) == strip(b)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path}: was {a!r}, now {b!r}"


def _ran_by() -> dict[str, Any]:
    """Which process ran a trial: host, pid and (in a fleet) the worker's label, for the record."""
    return {"study_host": socket.gethostname(), "study_pid": os.getpid(),
            "fleet_worker": os.environ.get("XLSTM_TUNE_FLEET_WORKER") or None}


def _now() -> str:
    from xlstm_tune.tracking.provenance import now_iso

    return now_iso()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return None


def run_study(opts: StudyOptions, out: TextIO | None = None, err: TextIO | None = None) -> StudyResult:
    """Run (or resume) a study; see the module docstring."""
    return StudyRun(opts, out, err).run()
