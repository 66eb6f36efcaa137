"""Planning a study: everything is read and checked, nothing is written or opened.

Any problem (a bad spec, an unknown sampler, an unreachable tracking server, a study resumed with other
settings) is a UserError here, before a file is created or a database opened.
"""
from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from xlstm_tune.errors import UserError
from xlstm_tune.study.faults import faults_from_env
from xlstm_tune.study.options import StudyOptions
from xlstm_tune.study.pruning import PruneRule
from xlstm_tune.study.space import SearchSpace, knob_key
from xlstm_tune.study.spec import apply_device_overrides, apply_overrides, load_spec, parse_spec
from xlstm_tune.study.storage import check_storage_url, describe_storage


@dataclass
class StudyPlan:
    """The resolved study: spec, space, objectives, prompt, where everything goes."""

    opts: StudyOptions
    out_dir: Path
    src: Any  # replay.ReplaySource or None
    spec: Any
    name: str
    model_info: dict[str, Any]
    caps: dict[str, Any]
    space: SearchSpace
    default_key: str
    enqueued: list[dict[str, Any]]
    objectives: list[str]
    sampler_name: str
    prompt: Any  # bench.workload.PromptSource
    tracking_uri: str
    faults: dict[int, str]
    files: Any  # tracking.study_files.StudyFiles
    identity: dict[str, Any]
    previous_meta: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    rule: PruneRule = field(default_factory=PruneRule)  # early stopping ([pruning])
    warm_seeds: list[tuple[dict[str, Any], Any]] = field(default_factory=list)  # (params, warm_start.Seed)

    @property
    def storage_label(self) -> str:
        return describe_storage(self.opts.storage, self.out_dir)

    @property
    def n_trials(self) -> int:
        return int(self.spec.study["n_trials"])


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


def check_tracking_server(uri: str) -> None:
    """An http(s) tracking URI must answer now, not after the first trial was measured."""
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


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """`path: was X, now Y` for the first key where two nested mappings differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
    return f"{path}: was {a!r}, now {b!r}"


def enqueue_params(space: SearchSpace, n: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Sampler params for one [study] enqueue entry, or a UserError saying why it cannot be measured."""
    knobs = dict(space.default_knobs(), **entry)
    why = space.check(knobs)
    params = None if why else space.params_for(knobs)
    if params is None:
        reason = why or "its values are not in [space] on this device"
        raise UserError(f"[study] enqueue entry {n} {dict(entry)} cannot be a trial ({reason}): "
                        f"change it or widen [space]")
    return params


def first_trials(space: SearchSpace, enqueued: Sequence[Mapping[str, Any]], warm_seeds: Sequence[tuple[Any, Any]],
                 *, fresh: bool = True, tried: Sequence[str] = ()) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(sampler params, trial user attrs) a study queues before its sampler draws, in the order they run.

    A fresh study measures the default configuration first (`baseline`: when the space holds it), then its
    [study] enqueue entries as given; then every warm-start seed (`origin`: where it came from,
    study.warm_start) whose configuration is none of those and none of `tried` (the knob keys of the
    trials a resumed or joined study already holds). `study` (study.runner) and the costed replay
    (study.replay) both queue from here, so a replayed study measures first what a real one does."""
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if fresh:
        default = space.params_for(space.default_knobs())
        if default is not None:
            out.append((default, {"baseline": True}))
        out += [(dict(params), {"enqueued": True}) for params in enqueued]
    seen = set(tried) | {space.params_key(params) for params, _ in out}
    for params, seed in warm_seeds:
        key = space.params_key(params)
        if key not in seen:
            seen.add(key)
            out.append((dict(params), {"origin": seed.origin}))
    return out


def make_plan(o: StudyOptions) -> StudyPlan:
    """Read the spec, probe the device and the model, resolve and check everything (no side effects)."""
    from xlstm_tune.bench.workload import PromptSource, describe_model, device_capabilities
    from xlstm_tune.study.replay import load_source, source_capabilities, source_model_info, source_spec_doc
    from xlstm_tune.study.samplers import check_sampler
    from xlstm_tune.tracking.mlflow_log import resolve_tracking_uri
    from xlstm_tune.tracking.study_files import StudyFiles, check_study_name

    out_dir = Path(o.out_dir)
    notes: list[str] = []
    src = load_source(o.replay, out_dir) if o.replay else None
    if o.experiment is not None:
        spec = load_spec(o.experiment)
    elif src is not None and source_spec_doc(src) is not None:
        spec = parse_spec(source_spec_doc(src), f"replay of {src.trials_path}")  # type: ignore[arg-type]
    else:
        spec = load_spec(None)
    caps = source_capabilities(src) if src is not None else device_capabilities(o.device or spec.model["device"])
    spec = apply_device_overrides(spec, caps["device_type"])
    notes += list(spec.notes)
    spec = apply_overrides(
        spec, study_name=o.study_name, n_trials=o.n_trials, sampler=o.sampler, seed=o.seed, timeout=o.timeout,
        trial_timeout=o.trial_timeout, model=o.model, device=o.device, dtype=o.dtype, compile=o.compile,
        context_lens=o.context_lens, new_tokens=o.new_tokens, repeats=o.repeats, objectives=o.objectives,
        prompt=o.prompt, prompt_file=o.prompt_file, knobs=o.knobs, config=o.config, runtime=o.runtime,
        early_stopping=o.early_stopping)
    if src is None and spec.runtime.get("prefill_graph"):
        from xlstm_tune.runtime.device import check_prefill_graphs

        check_prefill_graphs(caps["device"])  # refused here, before a storage or tracking store exists
    if src is not None and o.study_name is None:
        spec.study["name"] = f"{src.study_name}-replay-{spec.study['sampler']}-s{spec.study['seed']}"
    name = check_study_name(spec.name)
    model_info = source_model_info(src) if src is not None else describe_model(spec.model["name"])
    space = SearchSpace.resolve(spec, model_info, caps)
    default_key = knob_key(space.canonical(space.default_knobs()))
    enqueued = [enqueue_params(space, n, e) for n, e in enumerate(spec.study["enqueue"], 1)]
    notes += space.notes
    from xlstm_tune.study.warm_start import plan_seeds

    warm_seeds, warm_notes = plan_seeds(o.warm_start, out_dir, spec.objectives, space, caps.get("device_type", ""),
                                        shipped=spec.study["shipped_config"])
    notes += warm_notes
    objectives, obj_notes = effective_objectives(spec.objectives, space)
    notes += obj_notes
    sampler_name = spec.study["sampler"]
    check_sampler(sampler_name, len(objectives))
    if sampler_name == "grid":
        space.grid()  # raises if too large
    # prompt: a spec's prompt_file is relative to the spec file, a flag's to the working directory
    prompt_file = spec.workload["prompt_file"]
    if prompt_file and o.prompt_file is None and o.experiment and not Path(prompt_file).is_absolute():
        prompt_file = str(Path(o.experiment).parent / prompt_file)
    prompt = PromptSource.from_args(spec.workload["prompt"], prompt_file, seed=spec.workload["prompt_seed"])
    tracking_uri = resolve_tracking_uri(o.tracking_uri, out_dir)
    check_tracking_server(tracking_uri)
    check_storage_url(o.storage)
    files = StudyFiles.for_study(out_dir, name)
    identity = {"spec": spec.measurement_identity(), "objectives_effective": objectives,
                "device": caps.get("device"),
                "replay_source": str(src.trials_path.resolve()) if src else None}
    meta = files.read_run_meta()
    if meta is not None and meta.get("identity") is not None and meta["identity"] != identity:
        diff = first_difference(meta["identity"], identity)
        raise UserError(f"study {name!r} was run with different settings ({diff}): use the same settings "
                        f"to resume it, or pass a new --study-name")
    return StudyPlan(opts=o, out_dir=out_dir, src=src, spec=spec, name=name, model_info=model_info, caps=caps,
                     space=space, default_key=default_key, enqueued=enqueued, objectives=objectives,
                     sampler_name=sampler_name, prompt=prompt, tracking_uri=tracking_uri, faults=faults_from_env(),
                     files=files, identity=identity, previous_meta=meta, notes=notes,
                     rule=PruneRule.from_spec(spec.pruning), warm_seeds=warm_seeds)
