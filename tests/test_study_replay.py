"""The study loop driven by recorded measurements (replay): samplers, constraints, resume, files, MLflow.

No model runs here: a synthetic recorded grid stands in for measurements, so every study takes a second.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

from xlstm_tune.errors import UserError  # noqa: E402
from xlstm_tune.runtime.options import KNOBS, RuntimeOptions  # noqa: E402
from xlstm_tune.study.replay import (  # noqa: E402
    exhaustive_optimum,
    load_source,
    replay_trace,
    trials_to_reach,
)
from xlstm_tune.study.runner import StudyOptions, run_study  # noqa: E402
from xlstm_tune.study.space import SearchSpace, knob_key  # noqa: E402
from xlstm_tune.study.spec import parse_spec  # noqa: E402
from xlstm_tune.tracking.best_export import check_best  # noqa: E402
from xlstm_tune.tracking.study_files import StudyFiles  # noqa: E402

TINY = {"model_id": "tiny", "num_heads": 4, "slstm_num_heads": 4, "has_mlstm": True, "has_slstm": True,
        "config_hash": "f2282be27fef5e86"}
CPU = {"device": "cpu", "device_type": "cpu", "decode_modes": ["eager", "compiled"], "streams": False,
       "compile": True, "graphs": False}
LENS = [64, 256]
SPACE = {"backend": ["native", "queued"], "chunk_size": [16, 32, 64], "heads_per_band": [1, 2, 4],
         "workers": [1, 2], "t_inner": [1, 4, 8], "decode_mode": ["eager", "compiled"]}
FASTEST = {"backend": "native", "chunk_size": 64, "t_inner": 8, "decode_mode": "compiled"}


def _metrics(k: dict) -> dict:
    """A smooth synthetic landscape: native and big chunks are fast; compiled decode is fast."""
    base = (9000.0 if k["backend"] == "native" else 1500.0 * (1 + k["workers"] / 4) * (1 + 0.1 * k["heads_per_band"]))
    base *= 1 + math.log2(k["chunk_size"]) / 6 + 0.02 * k["t_inner"]
    out = {}
    for n in LENS:
        v = base * (1.1 if n == 256 else 1.0)
        out[f"prefill_tok_s_ctx{n}"] = v
        out[f"prefill_tok_s_ctx{n}_p20"] = v * 0.95
        out[f"prefill_tok_s_ctx{n}_p80"] = v * 1.05
        out[f"prefill_tok_s_ctx{n}_cv"] = 0.03
    out["prefill_tok_s"] = math.sqrt(out["prefill_tok_s_ctx64"] * out["prefill_tok_s_ctx256"])
    out["decode_tok_s"] = (1800.0 if k["decode_mode"] == "compiled" else 1000.0) * (1.0 if k["backend"] == "native" else 0.7)
    out["prefill_s"], out["decode_s"] = 0.1, 0.05
    return out


def make_source(root: Path, *, infeasible: dict | None = None, drop: int = 0, objectives=("prefill_tok_s",)) -> Path:
    """A recorded 'grid' study directory with run_meta.json and trials.jsonl."""
    doc = {"study": {"name": "src", "n_trials": 500, "sampler": "grid", "objectives": list(objectives)},
           "model": {"name": "tiny", "compile": False}, "workload": {"context_lens": LENS, "new_tokens": 8},
           "confirm": {"top_k": 2, "rounds": 1}, "space": SPACE}
    spec = parse_spec(doc, "synthetic")
    space = SearchSpace.resolve(spec, TINY, CPU)
    files = StudyFiles(root)
    n = 0
    for i, knobs in enumerate(space.iter_configs()):
        if drop and i % drop == 0:
            continue
        bad = infeasible is not None and all(knobs[k] == v for k, v in infeasible.items())
        rec = {"number": n, "state": "COMPLETE", **knobs, "key": knob_key(knobs), "feasible": not bad,
               "fidelity_passed": not bad, "fidelity_rel_err": 5e-2 if bad else 1e-7, "fidelity_rel_tol": 1e-4,
               **_metrics(knobs)}
        files.append_trial(rec)
        n += 1
    files.write_run_meta({"study_name": "src", "spec": spec.to_dict(), "model_info": TINY, "capabilities": CPU,
                          "device_summary": {"device": "cpu", "device_name": "test CPU", "os": "test",
                                             "torch_version": "x"}})
    return root


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("out")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "src", infeasible=FASTEST)


def study(out: Path, source: Path, **kw) -> tuple:
    o, e = io.StringIO(), io.StringIO()
    kw.setdefault("early_stopping", False)  # these tests count trials; early stopping: tests/test_pruning.py
    opts = StudyOptions(replay=str(source), out_dir=str(out), progress=False, **kw)
    res = run_study(opts, out=o, err=e)
    return res, o.getvalue(), e.getvalue()


def _load(out: Path, name: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))


# ---- replay basics ------------------------------------------------------------------------------------
def test_replay_is_deterministic_and_never_picks_an_infeasible_best(out: Path, source: Path) -> None:
    r1, text, _ = study(out, source, study_name="det-a", sampler="tpe", seed=3, n_trials=15)
    r2, _, _ = study(out, source, study_name="det-b", sampler="tpe", seed=3, n_trials=15)
    seq1 = [(r["key"], r.get("prefill_tok_s")) for r in r1.records]
    seq2 = [(r["key"], r.get("prefill_tok_s")) for r in r2.records]
    assert seq1 == seq2 and r1.completed == 15
    assert all(r.get("replayed_from") is not None or r.get("duplicate_of") is not None
               for r in r1.records if r["state"] == "COMPLETE")
    best = check_best(r1.best_path)
    fastest_key = knob_key(SearchSpace.resolve(parse_spec({"study": {"name": "x"}, "space": SPACE}), TINY, CPU)
                           .canonical(dict(RuntimeOptions().knobs(), **FASTEST, heads_per_band=4)))
    for ctx in best["contexts"]:
        assert knob_key(ctx["knobs"]) != fastest_key
        assert ctx["fidelity"]["passed"] is True
    assert [c["context_len"] for c in best["contexts"]] == LENS
    assert "Best configuration per context length" in text and "best.json" in text


@pytest.mark.parametrize("sampler", ["tpe", "ga", "random", "grid", "gp"])
def test_every_sampler_runs(out: Path, source: Path, sampler: str) -> None:
    res, _, _ = study(out, source, study_name=f"s-{sampler}", sampler=sampler, seed=0, n_trials=8)
    assert res.completed == 8
    feasible = [r for r in res.records if r["state"] == "COMPLETE" and r["feasible"]]
    assert feasible and res.best_path is not None


def test_cmaes_needs_one_objective(out: Path, source: Path) -> None:
    with pytest.raises(UserError, match="cmaes"):
        study(out, source, study_name="cma2", sampler="cmaes", objectives=["prefill_tok_s", "decode_tok_s"])


def test_pareto_study_balances_both_objectives(out: Path, source: Path) -> None:
    res, text, _ = study(out, source, study_name="pareto", sampler="ga", seed=1, n_trials=20,
                         objectives=["prefill_tok_s", "decode_tok_s"])
    st = _load(out, "pareto")
    assert len(st.directions) == 2 and st.best_trials
    assert all(not t.constraints or t.constraints.get("fidelity", 0) <= 0 for t in st.best_trials)
    best = check_best(res.best_path)
    assert {c["selection"] for c in best["contexts"]} == {"balanced"}
    assert "prefill_tok_s, decode_tok_s" in text


def test_unrecorded_configurations_are_pruned_not_counted(tmp_path: Path, out: Path) -> None:
    src = make_source(tmp_path / "sparse", drop=2)
    res, _, _ = study(out, src, study_name="sparse", sampler="random", seed=5, n_trials=10)
    pruned = [r for r in res.records if r["state"] == "PRUNED"]
    assert res.completed == 10 and pruned and {r["failure_reason"] for r in pruned} == {"not_recorded"}
    st = _load(out, "sparse")
    assert len(st.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 10


def test_invalid_combinations_are_pruned_before_running(tmp_path: Path, out: Path, source: Path) -> None:
    spec = tmp_path / "inv.toml"
    spec.write_text(
        '[study]\nname = "inv"\nobjectives = ["prefill_tok_s"]\n[model]\ncompile = false\n'
        '[workload]\ncontext_lens = [64, 256]\nnew_tokens = 8\n[confirm]\nrounds = 1\n'
        '[space]\nbackend = ["queued"]\nchunk_size = [16, 64]\nt_inner = [1, 32]\nheads_per_band = [2]\nworkers = [1]\n')
    res, _, _ = study(out, source, experiment=str(spec), study_name="inv", sampler="grid", n_trials=10)
    invalid = [r for r in res.records if r.get("failure_reason") == "invalid_combination"]
    assert len(invalid) == 1 and invalid[0]["state"] == "PRUNED" and "does not divide" in invalid[0]["error"]
    assert "replayed_from" not in invalid[0]  # never evaluated


# ---- resume and consistency ---------------------------------------------------------------------------
def _consistent(out: Path, name: str) -> tuple[list, list]:
    """Optuna, trials.jsonl, summary.csv and MLflow agree: one record and one run per finished trial."""
    from mlflow import MlflowClient

    st = _load(out, name)
    finished = [t for t in st.trials if t.state.is_finished()]
    files = StudyFiles.for_study(out, name)
    recs = files.read_trials()
    lines = [json.loads(x) for x in files.trials_path.read_text().splitlines() if x.strip()]
    assert sorted(r["number"] for r in lines) == sorted(t.number for t in finished) == [r["number"] for r in recs]
    import csv

    rows = list(csv.DictReader(files.summary_path.open()))
    assert sorted(int(r["number"]) for r in rows) == [r["number"] for r in recs]
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(f"xlstm_tune/{name}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    children = [r for r in runs if r.data.tags.get("xlstm_tune.role") == "trial"
                and r.data.tags.get("xlstm_tune.superseded_by_retry") != "true"]
    assert sorted(int(r.data.tags["xlstm_tune.trial"]) for r in children) == sorted(t.number for t in finished)
    for t, r in zip(sorted(finished, key=lambda t: t.number), sorted(children, key=lambda r: int(r.data.tags["xlstm_tune.trial"]))):
        assert r.info.status == ("FAILED" if t.state.name == "FAIL" else "FINISHED")
        assert r.data.tags["trial_state"] == t.state.name
    parents = [r for r in runs if r.data.tags.get("xlstm_tune.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    return finished, recs


def test_resume_finishes_recorded_trials_and_requeues_interrupted_ones(out: Path, source: Path) -> None:
    name = "resume"
    res, _, _ = study(out, source, study_name=name, sampler="random", seed=2, n_trials=5)
    assert res.new_trials >= 5
    # Simulate a process killed (a) after storing trial A's record but before telling Optuna,
    # and (b) in the middle of measuring trial B.
    st = _load(out, name)
    files = StudyFiles.for_study(out, name)
    rec_src = next(r for r in files.read_trials() if r["state"] == "COMPLETE")
    st.enqueue_trial(dict(rec_src["params"]))
    ta = st.ask()
    for k in rec_src["params"]:
        ta.suggest_categorical(k, SPACE[k])
    rec_a = dict(rec_src, number=ta.number, duplicate_of=rec_src["number"])
    rec_a.pop("mlflow_run_id", None)
    ta.set_user_attr("record", rec_a)
    params_b = {"backend": "queued", "chunk_size": 32, "heads_per_band": 2, "workers": 2, "t_inner": 4,
                "decode_mode": "eager"}
    st.enqueue_trial(params_b)
    tb = st.ask()
    for k in params_b:
        tb.suggest_categorical(k, SPACE[k])
    res2, text, _ = study(out, source, study_name=name, sampler="random", seed=2, n_trials=8)
    recs = {r["number"]: r for r in res2.records}
    assert recs[ta.number]["state"] == "COMPLETE"  # finished from its record, not measured again
    assert recs[tb.number]["state"] == "FAIL" and recs[tb.number]["failure_reason"] == "interrupted"
    requeued = [r for r in res2.records if r.get("requeued_from") == tb.number]
    assert len(requeued) == 1 and all(requeued[0][k] == v for k, v in params_b.items() if k != "workers")
    assert res2.completed == 8
    finished, _ = _consistent(out, name)
    # Running the finished study again does no new work.
    res3, text3, _ = study(out, source, study_name=name, sampler="random", seed=2, n_trials=8)
    assert res3.new_trials == 0 and len(res3.records) == len(finished)
    assert "0 new trial(s)" in text3


def test_resume_with_other_settings_refused_and_files_untouched(out: Path, source: Path, tmp_path: Path) -> None:
    name = "guard"
    study(out, source, study_name=name, sampler="random", seed=1, n_trials=3)
    files = StudyFiles.for_study(out, name)
    before = {p.name: p.read_bytes() for p in (files.trials_path, files.summary_path, files.run_meta_path, files.best_path)}
    journal = (out / "optuna.journal").read_bytes()
    with pytest.raises(UserError, match="different settings"):
        study(out, source, study_name=name, n_trials=4, context_lens=[64])
    with pytest.raises(UserError, match="unknown sampler"):
        study(out, source, study_name=name, sampler="bogus")
    with pytest.raises(UserError, match="empty"):
        study(out, source, study_name=name, knobs={"chunk_size": [64, 16]}, experiment=str(_empty_space(tmp_path)))
    after = {p.name: p.read_bytes() for p in (files.trials_path, files.summary_path, files.run_meta_path, files.best_path)}
    assert before == after and (out / "optuna.journal").read_bytes() == journal


def _empty_space(tmp: Path) -> Path:
    p = tmp / "empty.toml"
    p.write_text('[study]\nname = "guard"\n[space]\nt_inner = []\n')
    return p


# ---- sampler-efficiency helpers -----------------------------------------------------------------------
def test_trace_helpers(source: Path, tmp_path: Path) -> None:
    src = load_source(str(source), tmp_path)
    spec = parse_spec({"study": {"name": "x"}, "workload": {"context_lens": LENS}, "space": SPACE})
    space = SearchSpace.resolve(spec, TINY, CPU)
    best, key = exhaustive_optimum(src.lookup, space, "prefill_tok_s")
    assert best > 0 and "native" in key
    assert all(best >= r["prefill_tok_s"] for r in src.lookup.values() if r["fidelity_passed"])
    values = replay_trace(src.lookup, space, "random", 0, 30, "prefill_tok_s")
    assert len(values) == 30 and values == replay_trace(src.lookup, space, "random", 0, 30, "prefill_tok_s")
    assert trials_to_reach([None, 1.0, 5.0], 4.0) == 3 and trials_to_reach([1.0], 4.0) is None
    grid = replay_trace(src.lookup, space, "grid", 0, 10_000, "prefill_tok_s")
    assert len(grid) == math.prod(len(d.values()) for d in space.dims.values())  # every grid point, then stop
    assert set(KNOBS) <= set(next(iter(src.lookup.values())))


def test_sampler_efficiency_benchmark_runs(capsys) -> None:
    from benchmark_scripts import load_benchmark

    mod = load_benchmark("sampler_efficiency")
    assert mod.main(["--seeds", "2", "--samplers", "random,tpe,grid"]) == 0
    text = capsys.readouterr().out
    assert "recorded grid tiny_cpu_grid: 54 measured configurations" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["random"], ["tpe"], ["grid"])]
    assert sorted((r[0], r[1]) for r in rows) == sorted((n, s) for n in ("random", "tpe", "grid") for s in ("on", "off"))
    for r in rows:  # every run reached the target: its recorded seconds are a positive number
        assert r[7] == "0/2" and float(r[2].replace(",", "")) > 0


def test_database_storage_url_and_resume(out: Path, source: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    res, _, _ = study(out, source, study_name="rdb", sampler="tpe", seed=4, n_trials=4, storage=url)
    assert res.completed == 4 and "optuna.db" in res.paths["Optuna storage"]
    st = optuna.load_study(study_name="rdb", storage=url)
    st.ask()  # a trial left RUNNING by a "killed" process
    res2, _, _ = study(out, source, study_name="rdb", sampler="tpe", seed=4, n_trials=6, storage=url)
    assert res2.completed == 6
    states = [t.state.name for t in optuna.load_study(study_name="rdb", storage=url).trials]
    assert "RUNNING" not in states and states.count("COMPLETE") == 6
    journal = out / "optuna.journal"
    assert not journal.exists() or '"rdb"' not in journal.read_text()  # nothing went to the default journal
