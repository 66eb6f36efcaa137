"""Early stopping: the Pareto pruning rule on constructed data, replayed stage costs, and a real study on
`tiny`/CPU where a hopeless trial stops after its first measurement (recorded PRUNED in Optuna, MLflow and
trials.jsonl), including a kill during such a trial and the resume after it."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xlstm_tune.study import pruning
from xlstm_tune.study.pruning import PruneRule
from xlstm_tune.study.replay import replay_outcome, stage_plan
from xlstm_tune.study.timesplit import time_split


def _rec(n: int, *, pre: dict[int, float], dec: float | None = None, cv: float = 0.01, feasible: bool = True,
         duration: float = 10.0, state: str = "COMPLETE") -> dict:
    r = {"number": n, "state": state, "feasible": feasible, "duration_s": duration}
    for ctx, v in pre.items():
        r[f"prefill_tok_s_ctx{ctx}"] = v
        r[f"prefill_tok_s_ctx{ctx}_cv"] = cv
    if dec is not None:
        r["decode_tok_s"] = dec
        r["decode_tok_s_cv"] = cv
    return r


# ---- the rule on constructed data ----------------------------------------------------------------------
def test_single_objective_prunes_below_best_over_margin() -> None:
    best = random.uniform(500, 5000)
    recs = [_rec(0, pre={128: best}), _rec(1, pre={128: best / 3})]
    limits = pruning.thresholds(recs, ["prefill_tok_s"], PruneRule(margin=2.0, noise_k=3.0))
    assert limits is not None and [p["number"] for p in limits["front"]] == [0]
    why = pruning.verdict(limits, {"prefill_tok_s_ctx128": best / 2.2})
    assert why is not None and "trial #0" in why and "prefill_tok_s" in why
    assert pruning.verdict(limits, {"prefill_tok_s_ctx128": best / 1.8}) is None
    assert pruning.verdict(limits, {}) is None  # no figure yet: nothing to judge


def test_noise_widens_the_margin() -> None:
    recs = [_rec(0, pre={128: 1000.0}, cv=0.5)]  # very noisy study: margin = 1 + 3 * 0.5 = 2.5
    limits = pruning.thresholds(recs, ["prefill_tok_s"], PruneRule(margin=2.0, noise_k=3.0))
    assert limits["margins"]["prefill_tok_s_ctx128"] == pytest.approx(2.5)
    assert pruning.verdict(limits, {"prefill_tok_s_ctx128": 450.0}) is None  # 450 > 1000 / 2.5
    assert pruning.verdict(limits, {"prefill_tok_s_ctx128": 390.0}) is not None


def test_pareto_rule_keeps_a_trial_that_could_still_win_on_decode() -> None:
    # A: fast prefill, slow decode; B: slow prefill, best decode. A trial with only a prefill figure is
    # compared with the points that are within noise of the best decode (B), not with A.
    recs = [_rec(0, pre={128: 1000.0}, dec=10.0), _rec(1, pre={128: 100.0}, dec=100.0)]
    objectives = ["prefill_tok_s", "decode_tok_s"]
    limits = pruning.thresholds(recs, objectives, PruneRule(margin=2.0, noise_k=3.0))
    assert sorted(p["number"] for p in limits["front"]) == [0, 1]
    assert pruning.verdict(limits, {"prefill_tok_s_ctx128": 300.0}) is None  # 3x below A, but B cannot beat it
    why = pruning.verdict(limits, {"prefill_tok_s_ctx128": 40.0})
    assert why is not None and "trial #1" in why
    # a third point within decode noise of B (99 vs 100, CV 1%) but fast on prefill makes 300 hopeless
    recs.append(_rec(2, pre={128: 900.0}, dec=99.0))
    limits = pruning.thresholds(recs, objectives, PruneRule(margin=2.0, noise_k=3.0))
    why = pruning.verdict(limits, {"prefill_tok_s_ctx128": 300.0})
    assert why is not None and "trial #2" in why


def test_prefill_objective_uses_the_contexts_measured_so_far() -> None:
    recs = [_rec(0, pre={128: 1000.0, 512: 4000.0})]
    limits = pruning.thresholds(recs, ["prefill_tok_s"], PruneRule(margin=2.0, noise_k=0.0))
    # at the screen only ctx128 is known: 600 > 1000 / 2 goes on
    assert pruning.verdict(limits, {"prefill_tok_s_ctx128": 600.0}) is None
    # with ctx512 measured: geomean(600, 1000) = 775 < geomean(1000, 4000) / 2 = 1000
    assert pruning.verdict(limits, {"prefill_tok_s_ctx128": 600.0, "prefill_tok_s_ctx512": 1000.0}) is not None


def test_a_figure_taken_on_a_busy_machine_never_prunes() -> None:
    best = random.uniform(500, 5000)
    limits = pruning.thresholds([_rec(0, pre={128: best, 512: best})], ["prefill_tok_s"], PruneRule())
    hopeless = {"prefill_tok_s_ctx128": best / 10}
    assert pruning.verdict(limits, hopeless) is not None
    assert pruning.verdict(limits, {**hopeless, "prefill_busy_ctx128": True}) is None
    assert pruning.verdict(limits, {**hopeless, "prefill_busy_ctx128": False}) is not None
    # the next stage re-measures the context: once its figure is not busy, the rule applies again
    full = {**hopeless, "prefill_busy_ctx128": False, "prefill_tok_s_ctx512": best / 10, "prefill_busy_ctx512": False}
    assert pruning.verdict(limits, full) is not None
    # the flag travels with the stage's figures, so a replay decides as the worker did
    kept = pruning.stage_figures({**hopeless, "prefill_busy_ctx128": True, "prefill_other_cpu_frac_ctx128": 0.9})
    assert kept == {"prefill_tok_s_ctx128": best / 10, "prefill_busy_ctx128": 1.0}
    assert pruning.verdict(limits, kept) is None
    assert pruning.stage_figures({**hopeless, "prefill_busy_ctx128": False}) == hopeless


def test_the_one_call_screen_prunes_only_by_the_wider_screen_margin() -> None:
    """A screen figure 2-4x behind the front goes on to its full measurement (one call has come out at 0.47
    of the full figure); the same figure from the full measurement prunes; beyond 4x the screen prunes."""
    best = random.uniform(500, 5000)
    limits = pruning.thresholds([_rec(0, pre={128: best})], ["prefill_tok_s"], PruneRule())
    assert limits["screen_margin"] == 4.0
    near, far = {"prefill_tok_s_ctx128": best / random.uniform(2.2, 3.8)}, {"prefill_tok_s_ctx128": best / 4.4}
    assert pruning.verdict(limits, near, pruning.STAGE_SCREEN) is None
    assert pruning.verdict(limits, near, pruning.stage_prefill(128)) is not None
    why = pruning.verdict(limits, far, pruning.STAGE_SCREEN)
    assert why is not None and "/ 4.00 (trial #0)" in why
    narrow = pruning.thresholds([_rec(0, pre={128: best})], ["prefill_tok_s"], PruneRule(screen_margin=1.0))
    assert pruning.verdict(narrow, near, pruning.STAGE_SCREEN) is not None  # the noise margin still holds
    # a replay decides as the worker does: the near trial is measured on, the far one stops at its screen
    costs = {"screen": 1.0, "prefill_ctx128": 2.0, "decode": 3.0}
    for figure, stopped_at in ((near, "prefill_ctx128"), (far, "screen")):
        rec = {"number": 1, "state": "COMPLETE", **figure, "decode_tok_s": 9.0, "stage_s": costs,
               "stage_figures": {"screen": figure, "prefill_ctx128": figure, "decode": {"decode_tok_s": 9.0}}}
        out = replay_outcome(rec, stage_plan(rec, {"warmup": 1, "repeats": 3}, [128]), limits, None)
        assert out["state"] == "PRUNED" and out["pruned_stage"] == stopped_at
        assert out["duration_s"] == pytest.approx(sum(costs[k] for k in out["stage_s"]))


def test_nothing_is_pruned_without_a_feasible_measured_trial_or_when_disabled() -> None:
    infeasible = [_rec(0, pre={128: 1000.0}, feasible=False), _rec(1, pre={128: 1e6}, state="PRUNED")]
    assert pruning.thresholds(infeasible, ["prefill_tok_s"], PruneRule()) is None
    good = [_rec(0, pre={128: 1000.0})]
    assert pruning.thresholds(good, ["prefill_tok_s"], PruneRule(enabled=False)) is None
    assert pruning.thresholds(good, ["prefill_tok_s"], PruneRule(min_trials=2)) is None


def test_time_limit_follows_the_median_trial() -> None:
    recs = [_rec(i, pre={128: 1.0}, duration=d) for i, d in enumerate([10.0, 20.0, 300.0])]
    recs.append(_rec(9, pre={128: 1.0}, duration=999.0, state="PRUNED"))  # pruned trials do not count
    assert pruning.time_limit_s(recs, PruneRule(slow_factor=4.0, slow_min_s=5.0)) == pytest.approx(80.0)
    assert pruning.time_limit_s(recs, PruneRule(slow_factor=4.0, slow_min_s=100.0)) == pytest.approx(100.0)
    assert pruning.time_limit_s(recs, PruneRule(enabled=False)) is None
    assert pruning.slow_reason(81.0, 80.0) is not None and pruning.slow_reason(79.0, 80.0) is None


def test_replay_charges_a_pruned_trial_only_its_stages() -> None:
    costs = {"screen": random.uniform(1, 2), "prefill_ctx128": 5.0, "prefill_ctx512": 9.0, "decode": 3.0,
             "fidelity": 0.5}
    rec = {"number": 4, "state": "COMPLETE", "prefill_tok_s_ctx128": 90.0, "prefill_tok_s_ctx512": 95.0,
           "decode_tok_s": 50.0, "stage_s": costs,
           "stage_figures": {"screen": {"prefill_tok_s_ctx128": 80.0}, "prefill_ctx128": {"prefill_tok_s_ctx128": 90.0},
                             "prefill_ctx512": {"prefill_tok_s_ctx512": 95.0}, "decode": {"decode_tok_s": 50.0}}}
    plan = stage_plan(rec, {"warmup": 1, "repeats": 3}, [512, 128])
    assert [name for name, _, _ in plan] == ["screen", "prefill_ctx128", "prefill_ctx512", "decode"]
    limits = pruning.thresholds([_rec(0, pre={128: 1000.0, 512: 2000.0})], ["prefill_tok_s"], PruneRule())
    out = replay_outcome(rec, plan, limits, None, fidelity_s=costs["fidelity"])
    assert out["state"] == "PRUNED" and out["pruned_stage"] == "screen"
    assert out["duration_s"] == pytest.approx(costs["screen"])
    full = replay_outcome(rec, plan, None, None, fidelity_s=costs["fidelity"])
    assert full["state"] == "COMPLETE" and full["duration_s"] == pytest.approx(sum(costs.values()))


def test_time_split_sums_by_what_became_of_each_trial() -> None:
    recs = [
        {"number": 0, "state": "COMPLETE", "duration_s": 10.0, "phases": {"compile_s": 3.0, "fidelity_s": 1.0}},
        {"number": 1, "state": "PRUNED", "duration_s": 2.0, "failure_reason": "hopeless"},
        {"number": 2, "state": "FAIL", "duration_s": 4.0, "failure_reason": "crash"},
        {"number": 3, "state": "PRUNED", "failure_reason": "invalid_combination"},
        {"number": 4, "state": "COMPLETE", "duration_s": 0.0, "duplicate_of": 0},
    ]
    split = time_split(recs, load_s=5.0, confirm_s=6.0, wall_s=60.0)
    assert split["measuring"] == pytest.approx(6.0) and split["compile_warmup"] == pytest.approx(8.0)
    assert split["fidelity"] == pytest.approx(1.0) and split["pruned"] == pytest.approx(2.0)
    assert split["failed"] == pytest.approx(4.0) and split["confirmation"] == pytest.approx(6.0)
    assert split["other"] == pytest.approx(60.0 - 27.0) and split["trials"] == 3
    assert split["trials_per_min"] == pytest.approx(3.0)


# ---- a real study -------------------------------------------------------------------------------------------
SLOW = '{backend = "queued", chunk_size = 16, t_inner = 1, heads_per_band = 1, workers = 1}'
FAST = '{backend = "native", chunk_size = 64}'


def _spec(path: Path, name: str, n_trials: int) -> Path:
    # objective prefill only; native chunk 64 is enqueued right after the default, then a step-by-step
    # queued configuration (~10x slower prefill at 128 tokens on a CPU): the hopeless trial
    path.write_text(
        f'[study]\nname = "{name}"\nn_trials = {n_trials}\nsampler = "random"\nobjectives = ["prefill_tok_s"]\n'
        f'enqueue = [{FAST}, {SLOW}]\n'
        '[model]\nname = "tiny"\ndevice = "cpu"\ncompile = false\n'
        '[workload]\ncontext_lens = [128]\nnew_tokens = 4\n'
        # max_other_cpu = 1.0: no figure is flagged busy (a busy figure never prunes; that rule has its own
        # test), so the pruning path is exercised beside a CPU-heavy job too
        '[bench]\nwarmup = 0\nrepeats = 2\nmax_rounds = 1\nmax_other_cpu = 1.0\n'
        '[fidelity]\nprompt_len = 16\ndecode_steps = 2\n'
        '[trial]\ntimeout_s = 120\n'
        '[confirm]\ntop_k = 1\nrounds = 1\n'
        '[quality]\njudge = "none"\nperplexity = false\n'
        # one math thread (a shared 2-core machine makes two threads' native prefill 10-100x noisier); nothing
        # is pruned before two trials are measured, so the enqueued native trial always completes; the
        # step-by-step configuration is ~4-13x behind, a 1.5x margin at the screen too, without the noise
        # term (a busy machine's CV would widen it), stops it at its screen
        '[runtime]\nthreads = 1\n[pruning]\nmin_trials = 2\nmargin = 1.5\nscreen_margin = 1.5\nnoise_k = 0.0\n'
        '[space]\nbackend = ["native", "queued"]\nchunk_size = [16, 32, 64]\nheads_per_band = [1, 4]\n'
        'workers = [1, 4]\nt_inner = [1, 4, 16]\ndecode_mode = ["eager"]\n', encoding="utf-8")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_", "MLFLOW_"))}
    # one intra-op thread: on a shared 2-core machine two threads make native prefill 10-100x noisier
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _cli(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xlstm_tune", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=600)


def _stores(out: Path, name: str) -> tuple[dict, dict, dict]:
    """(Optuna trials, trials.jsonl records, live MLflow child runs) by trial number."""
    import optuna
    from mlflow import MlflowClient
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    st = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))
    trials = {t.number: t for t in st.trials}
    lines = [json.loads(x) for x in (out / "studies" / name / "trials.jsonl").read_text().splitlines() if x.strip()]
    numbers = [r["number"] for r in lines]
    assert len(numbers) == len(set(numbers)), "a trial recorded twice"
    client = MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(f"xlstm_tune/{name}")
    runs: dict[int, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get("xlstm_tune.role") == "trial" and r.data.tags.get("xlstm_tune.superseded_by_retry") != "true":
            runs.setdefault(int(r.data.tags["xlstm_tune.trial"]), []).append(r)
    return trials, {r["number"]: r for r in lines}, runs


def _check_pruned_everywhere(trials: dict, recs: dict, runs: dict, n: int) -> None:
    rec = recs[n]
    print({m: (r["state"], r["backend"], r.get("prefill_tok_s_ctx128"), r.get("stage_figures"), r.get("prune_reason"))
           for m, r in recs.items()})  # shown when an assertion below fails
    assert rec["state"] == "PRUNED" and rec["failure_reason"] == "hopeless", rec
    assert rec["pruned_stage"] == "screen"
    better = recs[int(rec["prune_reason"].rsplit("trial #", 1)[1].rstrip(")"))]  # the trial that beats it
    assert better["state"] == "COMPLETE" and better["feasible"] and better["number"] in (0, 1)
    assert better["prefill_tok_s_ctx128"] >= 2.0 * rec["prefill_tok_s_ctx128"]
    assert list(rec["stage_s"]) == ["screen"]  # stopped after its first measurement: nothing else ran
    assert rec["prefill_tok_s_ctx128"] > 0 and "decode_tok_s" not in rec and "fidelity_rel_err" not in rec
    assert trials[n].state.name == "PRUNED"
    stored = trials[n].user_attrs["record"]
    assert stored["prune_reason"] == rec["prune_reason"] and trials[n].user_attrs["failure_reason"] == "hopeless"
    (run,) = runs[n]
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "PRUNED"
    assert run.data.tags["pruned"] == "true" and run.data.tags["prune_reason"] == rec["prune_reason"]
    assert run.data.metrics["prefill_tok_s_ctx128"] == pytest.approx(rec["prefill_tok_s_ctx128"])


@pytest.mark.slow
def test_hopeless_trial_stops_after_its_first_measurement(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "p.toml", "prune", n_trials=3)
    proc = _cli(tmp_path, "study", "--experiment", str(spec), "--out-dir", "out", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials, recs, runs = _stores(tmp_path / "out", "prune")
    assert recs[0]["state"] == "COMPLETE" and recs[1]["state"] == "COMPLETE"  # default, then native
    assert recs[1]["backend"] == "native"
    _check_pruned_everywhere(trials, recs, runs, 2)
    assert recs[2]["origin"] == "[study] enqueue"
    assert "Where the time went:" in proc.stdout and "pruned trials" in proc.stdout
    meta = json.loads((tmp_path / "out" / "studies" / "prune" / "run_meta.json").read_text())
    assert meta["time_split"]["pruned_trials"] >= 1 and meta["time_split"]["pruned"] > 0
    report = (tmp_path / "out" / "studies" / "prune" / "report.md").read_text()
    assert "## Where the time went" in report and "## Where the first trials came from" in report
    # turned off, the same configuration is measured to the end
    off = _cli(tmp_path, "study", "--experiment", str(spec), "--out-dir", "out_off", "--no-progress",
               "--no-early-stopping", "--n-trials", "3")
    assert off.returncode == 0, off.stderr[-3000:]
    _, recs_off, _ = _stores(tmp_path / "out_off", "prune")
    assert recs_off[2]["state"] == "COMPLETE" and "decode_tok_s" in recs_off[2]
    assert set(recs_off[2]["stage_s"]) >= {"screen", "prefill_ctx128", "decode", "fidelity"}


@pytest.mark.slow
def test_kill_during_an_early_stopped_trial_then_resume(tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    spec = _spec(tmp_path / "k.toml", "killp", n_trials=3)
    args = ["study", "--experiment", str(spec), "--out-dir", "out", "--no-progress"]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_tune", *args], cwd=tmp_path,
                            env=_env(XLSTM_TUNE_INJECT_FAULT="2:delay"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        seen = False
        while time.monotonic() < deadline and not seen:
            time.sleep(0.5)
            trials_file = out / "studies" / "killp" / "trials.jsonl"
            if trials_file.is_file() and len(trials_file.read_text().splitlines()) >= 2:
                try:
                    st = optuna.load_study(study_name="killp",
                                           storage=JournalStorage(JournalFileBackend(str(out / "optuna.journal"))))
                    seen = any(t.state.name == "RUNNING" and t.number == 2 for t in st.trials)
                except Exception:  # noqa: BLE001 - the journal is being written
                    seen = False
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert seen, "trial 2 (the hopeless one) never seen RUNNING"
        time.sleep(1.0)  # inside its injected pause, before its first measurement
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    again = _cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    trials, recs, runs = _stores(out, "killp")
    assert not [t for t in trials.values() if t.state.name == "RUNNING"]
    finished = sorted(n for n, t in trials.items() if t.state.is_finished())
    assert sorted(recs) == finished and sorted(runs) == finished
    assert all(len(v) == 1 for v in runs.values()), "more than one live MLflow run for a trial"
    for n in finished:
        assert recs[n]["state"] == trials[n].state.name == runs[n][0].data.tags["trial_state"]
    assert recs[2]["state"] == "FAIL" and recs[2]["failure_reason"] == "interrupted"
    (requeued,) = [r for r in recs.values() if r.get("requeued_from") == 2]
    assert requeued["params"] == recs[2]["params"]
    _check_pruned_everywhere(trials, recs, runs, requeued["number"])
    assert requeued["origin"] == "re-queued from trial 2 ([study] enqueue)"


def test_costed_replay_charges_pruned_trials_less_on_the_same_proposals() -> None:
    from xlstm_tune.study.replay import load_source, replay_costed, source_capabilities, source_model_info, source_spec_doc
    from xlstm_tune.study.space import SearchSpace
    from xlstm_tune.study.spec import parse_spec

    grid = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "tiny_cpu_grid"
    src = load_source(str(grid), grid.parent)
    spec = parse_spec(source_spec_doc(src), "grid")
    space = SearchSpace.resolve(spec, source_model_info(src), source_capabilities(src))
    seed = random.randrange(1000)
    kw = dict(max_trials=25, sampler_trials=20)
    on = replay_costed(src, space, "random", seed, ["prefill_tok_s"], PruneRule(), **kw)
    off = replay_costed(src, space, "random", seed, ["prefill_tok_s"], PruneRule(enabled=False), **kw)
    # random search proposes the same configurations whatever the outcomes; only their cost and state differ
    assert [e.key for e in on] == [e.key for e in off] and len(on) == 25
    assert all(e.state == "COMPLETE" for e in off)
    pruned = [(a, b) for a, b in zip(on, off) if a.state == "PRUNED" and b.cost_s > 0]  # repeats cost nothing
    assert pruned, "a 25-trial random study over the tiny grid prunes some step-block configuration"
    assert all(a.cost_s < b.cost_s for a, b in pruned)
    assert all(a.cost_s == pytest.approx(b.cost_s) for a, b in zip(on, off) if a.state == "COMPLETE")
    assert sum(e.cost_s for e in on) < sum(e.cost_s for e in off)
