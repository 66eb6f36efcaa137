"""Warm starts: an earlier study's Pareto front (or a best.json) becomes the first trials of a new study,
each with its origin in Optuna, trials.jsonl and report.md. The new study replays the recorded tiny CPU
grid (benchmarks/data/tiny_cpu_grid), so no model runs and a study takes seconds."""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

from xlstm_tune.cli.main import main  # noqa: E402
from xlstm_tune.runtime.options import KNOBS  # noqa: E402
from xlstm_tune.study.replay import load_source  # noqa: E402
from xlstm_tune.study.runner import StudyOptions, run_study  # noqa: E402
from xlstm_tune.runtime.config_file import load_config, shipped_config  # noqa: E402
from xlstm_tune.study.warm_start import resolve  # noqa: E402
from xlstm_tune.tracking.best_export import build_best, export_best  # noqa: E402
from xlstm_tune.tracking.study_files import StudyFiles  # noqa: E402

GRID = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "tiny_cpu_grid"
OBJECTIVES = ["prefill_tok_s", "decode_tok_s"]


def _earlier_study(out: Path) -> tuple[list[dict], list[dict]]:
    """An earlier study under `out` with two front points (A fast prefill, B fast decode) and a dominated C."""
    src = load_source(str(GRID), GRID.parent)
    configs = random.Random().sample(sorted(src.lookup), 3)
    files = StudyFiles.for_study(out, "earlier").ensure_dirs()
    files.write_run_meta({"study_name": "earlier"})
    figures = [(5000.0, 100.0), (1000.0, 900.0), (900.0, 90.0)]  # A, B, C (C dominated by A)
    recs = []
    for n, (key, (pre, dec)) in enumerate(zip(configs, figures)):
        knobs = {k: src.lookup[key][k] for k in KNOBS}
        rec = {"number": n, "state": "COMPLETE", "feasible": True, **knobs, "key": key,
               "prefill_tok_s_ctx128": pre, "prefill_tok_s": pre, "decode_tok_s": dec}
        files.append_trial(rec)
        recs.append(rec)
    return recs[:2], recs[2:]


def _run(out: Path, name: str, warm: list[str], n_trials: int = 4):
    return run_study(StudyOptions(replay=str(GRID), out_dir=str(out), study_name=name, n_trials=n_trials,
                                  objectives=OBJECTIVES, warm_start=warm, progress=False, sampler="tpe"),
                     out=io.StringIO(), err=io.StringIO())


def _trials(out: Path, name: str) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    st = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))
    return sorted(st.trials, key=lambda t: t.number)


def _knobs(rec: dict) -> dict:
    return {k: rec[k] for k in KNOBS}


def test_warm_start_enqueues_the_earlier_front_and_records_origins(tmp_path: Path) -> None:
    out = tmp_path / "out"
    front, dominated = _earlier_study(out)
    res = _run(out, "warm", ["earlier"], n_trials=6)
    trials = _trials(out, "warm")
    assert trials[0].user_attrs.get("baseline") is True
    recs = {r["number"]: r for r in res.records}
    seeded = [r for r in res.records if str(r.get("origin", "")).startswith("warm start: earlier front")]
    # both front points (unless one is the default configuration, which is measured first anyway)
    default_key = recs[0]["key"]
    expected = [f["key"] for f in front if f["key"] != default_key]
    assert [r["key"] for r in seeded] == expected
    assert [r["number"] for r in seeded] == list(range(1, 1 + len(expected)))  # right after the default
    for r in seeded:
        t = trials[r["number"]]
        assert t.user_attrs["origin"] == r["origin"] and f"trial #{[f['key'] for f in front].index(r['key'])}" in r["origin"]
    assert dominated[0]["key"] not in [r["key"] for r in seeded if r["number"] <= len(expected)]
    report = (out / "studies" / "warm" / "report.md").read_text()
    assert "## Where the first trials came from" in report and "warm start: earlier front" in report
    # resuming with the same warm start enqueues nothing twice
    again = _run(out, "warm", ["earlier"], n_trials=7)
    origins = [r.get("origin") for r in again.records if str(r.get("origin", "")).startswith("warm start")]
    assert len(origins) == len(expected)
    assert recs[1]["key"] in {r["key"] for r in again.records}


def test_warm_start_from_best_json_and_the_shipped_configs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = load_source(str(GRID), GRID.parent)
    key = random.Random().choice(sorted(k for k in src.lookup if "native" in k and "chunk_size=64" not in k))
    knobs = _knobs(src.lookup[key])
    best = build_best([{"context_len": 128, "knobs": knobs, "metrics": {}, "fidelity": {"passed": True}}],
                      {"device_name": "cpu", "model_id": "tiny", "model_config_hash": "x", "study_name": "other",
                       "trial_number": 3, "mlflow_run_id": None})
    path = export_best(tmp_path / "best.json", best)
    res = _run(out, "fromjson", [str(path)])
    seeded = [r for r in res.records if r.get("origin") == "warm start: other best.json (context 128)"]
    assert len(seeded) == 1 and seeded[0]["key"] == key and seeded[0]["number"] == 1
    # the shipped configs/cpu.toml comes after the given sources (the replayed grid is a CPU grid)
    shipped = [r for r in res.records if r.get("origin") == "shipped configs/cpu.toml"]
    knobs_cpu = load_config(shipped_config("cpu")).knobs
    assert len(shipped) == 1 and shipped[0]["number"] == 2
    assert all(shipped[0][k] == v for k, v in knobs_cpu.items() if k in ("backend", "chunk_size"))


def test_a_missing_warm_start_source_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["study", "--replay", str(GRID), "--out-dir", str(tmp_path / "out"), "--warm-start", "no-such-study",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--warm-start 'no-such-study'" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(Exception, match="no study there"):
        resolve(str(tmp_path / "nothing"), tmp_path)


def test_first_trials_queue_each_configuration_once_in_study_order() -> None:
    """study.plan.first_trials, which both `study` and the costed replay queue from: the default, then the
    enqueued entries as given, then warm seeds, each seed skipped where its configuration is already
    queued or tried."""
    from xlstm_tune.study.plan import first_trials
    from xlstm_tune.study.replay import source_capabilities, source_model_info, source_spec_doc
    from xlstm_tune.study.space import SearchSpace
    from xlstm_tune.study.spec import parse_spec
    from xlstm_tune.study.warm_start import Seed

    src = load_source(str(GRID), GRID.parent)
    space = SearchSpace.resolve(parse_spec(source_spec_doc(src), "grid"), source_model_info(src),
                                source_capabilities(src))
    default = space.params_for(space.default_knobs())
    assert default is not None
    others = random.Random().sample([k for k in sorted(src.lookup) if k != space.params_key(default)], 3)
    a, b, c = (space.params_for(_knobs(src.lookup[k])) for k in others)
    seeds = [(default, Seed({}, "s-default")), (a, Seed({}, "s-a")), (b, Seed({}, "s-b")),
             (b, Seed({}, "s-b-again")), (c, Seed({}, "s-c"))]
    queue = first_trials(space, [a], seeds)
    assert [attrs for _, attrs in queue] == [{"baseline": True}, {"enqueued": True}, {"origin": "s-b"},
                                             {"origin": "s-c"}]
    assert [space.params_key(p) for p, _ in queue] == [space.params_key(default), others[0], others[1], others[2]]
    # a resumed study queues no default or enqueue entries again, and no seed it has tried
    again = first_trials(space, [a], seeds, fresh=False, tried=[others[2]])
    assert [attrs for _, attrs in again] == [{"origin": "s-default"}, {"origin": "s-a"}, {"origin": "s-b"}]


def test_a_stop_while_a_queued_trial_is_being_sampled_puts_it_back(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C can arrive after Optuna hands out a trial and before its parameters are all sampled (a
    launcher stopping its workers does exactly that): the process records the trial itself, FAIL
    `interrupted` in Optuna and trials.jsonl, and queues the configuration again; resuming finishes."""
    from xlstm_tune.study.space import SearchSpace

    out = tmp_path / "out"
    real_suggest = SearchSpace.suggest
    stopped: list[int] = []

    def suggest_then_stop(self, trial):  # the first knob sampled, then the signal's KeyboardInterrupt
        if trial.number == 1 and not stopped:
            stopped.append(trial.number)
            self._suggest(trial, "backend")
            raise KeyboardInterrupt
        return real_suggest(self, trial)

    monkeypatch.setattr(SearchSpace, "suggest", suggest_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(out, "stop", [], n_trials=3)
    trials = _trials(out, "stop")
    assert stopped == [1] and not [t for t in trials if t.state.name == "RUNNING"]
    first = trials[1]  # the shipped configs/cpu.toml, queued right after the default
    fixed = first.system_attrs["fixed_params"]
    assert first.user_attrs.get("origin") == "shipped configs/cpu.toml" and len(first.params) == 1
    assert first.state.name == "FAIL" and first.user_attrs["record"]["failure_reason"] == "interrupted"
    (again,) = [t for t in trials if t.user_attrs.get("requeued_from") == 1]
    assert again.state.name == "WAITING" and again.system_attrs["fixed_params"] == fixed
    lines = StudyFiles.for_study(out, "stop").read_trials()
    assert [r["failure_reason"] for r in lines if r["number"] == 1] == ["interrupted"]
    monkeypatch.setattr(SearchSpace, "suggest", real_suggest)
    res = _run(out, "stop", [], n_trials=3)
    assert len([r for r in res.records if r["state"] == "COMPLETE"]) == 3
    measured = _trials(out, "stop")[again.number]
    assert measured.state.name == "COMPLETE" and measured.params == fixed  # the whole configuration, measured


def test_requeue_queues_a_stopped_configuration_once(tmp_path: Path) -> None:
    """Putting a stopped queued trial back adds its configuration unless the same one is already waiting
    (a warm start and an enqueue entry can name the same configuration): never a second copy."""
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from xlstm_tune.study.ownership import requeue

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'q.db'}", directions=["maximize", "maximize"])
    chosen = {"backend": "native", "chunk_size": random.choice([16, 32, 64, 128])}
    study.enqueue_trial(chosen)
    study.enqueue_trial(chosen)
    stopped = study.ask()
    stopped.suggest_categorical("backend", ["native", "queued"])  # stopped before chunk_size was suggested
    frozen = study._storage.get_trial(stopped._trial_id)
    session = SimpleNamespace(study=study)

    def waiting() -> list:
        return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    requeue(session, frozen, dict(frozen.system_attrs["fixed_params"]))
    assert len(waiting()) == 1  # the second copy enqueued above is already waiting
    study.ask()  # that copy is taken
    requeue(session, frozen, dict(frozen.system_attrs["fixed_params"]))
    (again,) = waiting()
    assert again.system_attrs["fixed_params"] == chosen and again.user_attrs["requeued_from"] == frozen.number
