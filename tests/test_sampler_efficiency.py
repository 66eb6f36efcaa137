"""What a costed replay charges: the recorded stage costs of the trials it ran, nothing more, nothing less.

The recorded H200 grid (benchmarks/data/xlstm350m_h200_grid) keeps each trial's seconds per measurement
stage (`stage_s`); a replayed study is charged exactly those of the stages it ran, repeats nothing, and
only stages the recording never ran are estimated (and say so).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

pytest.importorskip("optuna")

from xlstm_tune.study import pruning  # noqa: E402
from xlstm_tune.study.pruning import PruneRule  # noqa: E402
from xlstm_tune.study.replay import (  # noqa: E402
    load_source,
    replay_costed,
    source_capabilities,
    source_model_info,
    source_spec_doc,
    study_queue,
)
from xlstm_tune.study.space import SearchSpace, knob_key  # noqa: E402
from xlstm_tune.study.spec import parse_spec  # noqa: E402

GRID = Path(__file__).resolve().parent.parent / "benchmarks" / "data" / "xlstm350m_h200_grid"
# every backend: the wide 350M grid recorded on an H200 with Ray installed, and the tiny CPU grid with ray
ALL_BACKENDS = [GRID.parent / "xlstm350m_h200_all", GRID.parent / "tiny_cpu_all"]
OBJECTIVES = ["prefill_tok_s", "decode_tok_s"]


def _grid(path: Path = GRID):
    src = load_source(str(path), path.parent)
    spec = parse_spec(source_spec_doc(src), "grid")
    space = SearchSpace.resolve(spec, source_model_info(src), source_capabilities(src))
    return src, spec, space


@pytest.mark.parametrize("early_stopping", [True, False])
def test_charged_cost_is_the_recorded_stage_costs_of_the_trials_run(early_stopping: bool) -> None:
    src, spec, space = _grid()
    rule = dataclasses.replace(PruneRule.from_spec(spec.pruning), enabled=early_stopping)
    sampler = random.choice(["random", "tpe"])
    events = replay_costed(src, space, sampler, random.randrange(1000), OBJECTIVES, rule, max_trials=40,
                           sampler_trials=20)
    assert len(events) == 40
    order = pruning.stages(spec.workload["context_lens"]) + ["fidelity"]
    seen: set[str] = set()
    expected = 0.0
    for e in events:
        if e.key in seen:  # a repeat is answered from the first measurement
            assert e.cost_s == 0.0 and e.stage_s == {}
            continue
        seen.add(e.key)
        rec = src.lookup.get(e.key) or src.partial[e.key]
        recorded = rec["stage_s"]
        assert e.cost_s == pytest.approx(sum(e.stage_s.values()))
        assert list(e.stage_s) == order[:len(e.stage_s)]  # stages in measurement order, none skipped
        for name, cost in e.stage_s.items():
            if name in e.estimated:
                continue
            assert cost == recorded[name]
            expected += cost
        # only a configuration the recording pruned has stages it never ran, all after where it stopped
        assert all(n not in recorded for n in e.estimated)
        if e.estimated:
            assert rec["state"] == "PRUNED"
            assert order.index(e.estimated[0]) > order.index(rec["pruned_stage"])
        expected += sum(e.stage_s[n] for n in e.estimated)
        if e.state == "COMPLETE" and rec["state"] == "COMPLETE":  # measured to the end, as when recorded
            assert e.cost_s == pytest.approx(sum(recorded.values())) and not e.estimated
    assert sum(e.cost_s for e in events) == pytest.approx(expected)
    if not early_stopping:  # every recorded-pruned configuration is measured further: estimated
        assert any(e.estimated for e in events)


def test_replay_measures_what_the_study_measures_first_and_early_stopping_then_needs_no_estimates() -> None:
    src, spec, space = _grid()
    queue = study_queue(src, space, OBJECTIVES)
    # the 350M default lies outside this space; the shipped CUDA configuration is measured first
    assert space.params_for(space.default_knobs()) is None and len(queue) == 1
    first = space.params_key(queue[0])
    assert first in src.lookup and "backend=native" in first
    rule = PruneRule.from_spec(spec.pruning)
    events = replay_costed(src, space, "random", random.randrange(1000), OBJECTIVES, rule, max_trials=30,
                           sampler_trials=20)
    assert events[0].key == first and events[0].state == "COMPLETE"
    # with a native front from the first trial, every queued configuration stops where it stopped when recorded
    queued = [e for e in events if "backend=queued" in e.key and e.cost_s > 0]
    assert queued and all(e.state == "PRUNED" and not e.estimated for e in queued)
    # without it, a queued configuration sampled first has no front to be stopped by: measured further
    for seed in range(50):
        bare = replay_costed(src, space, "random", seed, OBJECTIVES, rule, max_trials=1, sampler_trials=20,
                             enqueue=[])
        if "backend=queued" in bare[0].key:
            break
    assert "backend=queued" in bare[0].key and bare[0].estimated


def _benchmark():
    return load_benchmark("sampler_efficiency")


def test_runs_that_never_reach_the_target_count_in_the_median(capsys) -> None:
    mod = _benchmark()
    assert mod.main(["--data", str(GRID), "--seeds", "3", "--samplers", "random", "--budget", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("random ")]
    assert len(rows) == 2
    for r in rows:
        never = int(r[7].split("/")[0])
        # two trials (the shipped configuration, then one draw) rarely reach the one target configuration
        assert (r[2] == "never") == (never >= 2)
        assert r[5] == "never" or float(r[5]) <= 2.0
    assert mod.quantile([1.0, float("inf")], 0.5) == float("inf") and mod.quantile([1.0, 3.0], 0.5) == 2.0


def test_tpe_models_after_four_start_up_trials_unless_the_spec_says_otherwise() -> None:
    """TPE's start-up phase (docs/STUDY.md §10): 4 random trials up to 49-trial studies, then a tenth; the
    spec's [sampler] n_startup_trials wins; GP keeps a third of the study (it got worse with fewer)."""
    from xlstm_tune.study.samplers import make_sampler

    n = random.randint(5, 49)
    assert make_sampler("tpe", seed=0, n_objectives=2, n_trials=n)._n_startup_trials == 4
    assert make_sampler("tpe", seed=0, n_objectives=2, n_trials=200)._n_startup_trials == 10
    assert make_sampler("tpe", seed=0, n_objectives=2, n_trials=n, options={"n_startup_trials": 7})._n_startup_trials == 7
    assert make_sampler("gp", seed=0, n_objectives=2, n_trials=21)._n_startup_trials == 7


@pytest.mark.parametrize("path", ALL_BACKENDS, ids=lambda p: p.name)
def test_the_all_backends_grid_holds_every_configuration_of_its_space_and_replays_to_its_optimum(path: Path) -> None:
    """Every configuration of the recorded space, ray's included, has a record (measured to the end or
    pruned with its partial cost), so a replayed study over it never meets a configuration it cannot cost."""
    src, spec, space = _grid(path)
    objectives = spec.objectives
    assert set(space.backends()) == {"native", "queued", "ray"}
    keys = {knob_key(k) for k in space.iter_configs()}
    recorded = set(src.lookup) | set(src.partial)
    assert keys <= recorded, sorted(keys - recorded)[:3]
    # native configurations were all measured in full; queued and ray ones pruned
    assert {k.split("|")[0] for k in src.partial} == {"backend=queued", "backend=ray"}
    rule = PruneRule.from_spec(spec.pruning)
    sampler = random.choice(["random", "tpe"])
    events = replay_costed(src, space, sampler, random.randrange(1000), objectives, rule,
                           max_trials=2 * len(keys), sampler_trials=20)
    assert all(e.cost_s >= 0.0 for e in events)
    # a hopeless ray configuration is stopped where the recording stopped it, charged only its screen
    ray = [e for e in events if "backend=ray" in e.key and e.cost_s > 0]
    assert ray and all(e.state == "PRUNED" and not e.estimated for e in ray)


def test_the_streams_grid_records_every_stream_count_of_its_space_with_its_own_screen() -> None:
    """The H200 grid that varies `streams` (benchmarks/data/xlstm350m_h200_streams): every queued
    configuration of the recorded space, each stream count 0, 1, 2 and 4 among them, has a record with
    its own screened prefill figure and screen cost, and issued its tasks on side streams exactly when
    streams > 0 (counted by the run, not read back from the option); the one native configuration was
    measured to the end."""
    src, spec, space = _grid(GRID.parent / "xlstm350m_h200_streams")
    configs = list(space.iter_configs())
    assert {k["streams"] for k in configs if k["backend"] == "queued"} == {0, 1, 2, 4}
    keys = {knob_key(k) for k in configs}
    assert keys <= set(src.lookup) | set(src.partial), sorted(keys - set(src.lookup) - set(src.partial))[:3]
    assert [k for k in src.lookup if k in keys] == [knob_key(k) for k in configs if k["backend"] == "native"]
    for key in keys - set(src.lookup):
        rec = src.partial[key]
        assert rec["stage_s"]["screen"] > 0 and rec["prefill_tok_s_ctx512"] > 0, key
        ran = rec["stats"]["ctx512"]
        assert ran["tasks_dispatched"] > 0
        assert ran["stream_tasks"] == (ran["tasks_dispatched"] if rec["streams"] else 0), key


def test_a_redrawn_recording_scales_each_configurations_figures_together_and_keeps_the_rest() -> None:
    """--noise: per configuration one factor per figure (the screen's figure moves with its context's),
    prefill_tok_s stays the geometric mean of its contexts, costs are untouched; the same seed draws the
    same recording, sigma 0 the recording itself."""
    mod = _benchmark()
    src, _, _ = _grid(ALL_BACKENDS[0])
    seed = random.randrange(10**6)
    same = mod.perturbed(src, 0.0, seed)
    assert same.lookup == src.lookup and same.partial == src.partial
    drawn, again = mod.perturbed(src, 0.1, seed), mod.perturbed(src, 0.1, seed)
    assert drawn.lookup == again.lookup and drawn.lookup != src.lookup
    factors = set()
    for key, rec in src.lookup.items():
        new = drawn.lookup[key]
        f512 = new["prefill_tok_s_ctx512"] / rec["prefill_tok_s_ctx512"]
        f2048 = new["prefill_tok_s_ctx2048"] / rec["prefill_tok_s_ctx2048"]
        geomean = (new["prefill_tok_s_ctx512"] * new["prefill_tok_s_ctx2048"]) ** 0.5
        assert new["prefill_tok_s"] == pytest.approx(geomean)
        assert new["stage_figures"]["screen"]["prefill_tok_s_ctx512"] == pytest.approx(
            rec["stage_figures"]["screen"]["prefill_tok_s_ctx512"] * f512)
        f_decode = new["decode_tok_s"] / rec["decode_tok_s"]
        assert new["decode_tok_s_p80"] / rec["decode_tok_s_p80"] == pytest.approx(f_decode)
        assert new["stage_s"] == rec["stage_s"] and new["key"] == rec["key"]
        factors |= {round(f512, 12), round(f2048, 12)}
    assert len(factors) == 2 * len(src.lookup)  # every configuration and figure its own draw
    assert rec["prefill_tok_s_ctx512"] == src.lookup[key]["prefill_tok_s_ctx512"]  # the source is not modified


def test_the_benchmark_replays_redrawn_recordings(capsys) -> None:
    mod = _benchmark()
    assert mod.main(["--data", str(ALL_BACKENDS[1]), "--seeds", "3", "--samplers", "random", "--noise", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "noise 10%: each seed's recording re-drawn" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("random ")]
    assert [r[1] for r in rows] == ["on", "off"]
    assert mod.main(["--data", str(ALL_BACKENDS[1]), "--noise", "2"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line, naming the fix


def test_the_cpu_decode_grid_records_both_decode_modes_and_where_the_compile_was_paid() -> None:
    """benchmarks/data/tiny_cpu_decode: every configuration of its space (eager and compiled decode) measured
    to the end, each with the step that ran; torch.compile's first compile is in the first compiled
    configuration's recorded cost only (the worker keeps the compiled step), which replay charges there."""
    src, spec, space = _grid(GRID.parent / "tiny_cpu_decode")
    keys = {knob_key(k) for k in space.iter_configs()}
    assert keys == set(src.lookup) and not src.partial
    modes = {r["decode_mode"] for r in src.lookup.values()}
    assert modes == {"eager", "compiled"}
    assert all(r["decode_path"] == r["decode_mode"] for r in src.lookup.values())
    compiled = sorted((r for r in src.lookup.values() if r["decode_mode"] == "compiled"), key=lambda r: r["number"])
    assert compiled[0]["decode_compile_s"] > 1.0  # the first compile, seconds on a CPU
    assert all(r["decode_compile_s"] < compiled[0]["decode_compile_s"] / 10 for r in compiled[1:])
    assert compiled[0]["stage_s"]["decode"] >= compiled[0]["decode_compile_s"]


def test_the_gpu_decode_grid_records_every_decode_mode_of_native_and_screens_queued() -> None:
    """benchmarks/data/xlstm350m_h200_decode: every native configuration of its space (chunk 64/128/256 x
    eager/graph/compiled) measured to the end with the step that ran (graph through the fused kernels);
    the compiled step's first compile is in the first compiled configuration's cost only; every queued
    configuration has its own screened figure and stopped there."""
    src, spec, space = _grid(GRID.parent / "xlstm350m_h200_decode")
    configs = list(space.iter_configs())
    native = {knob_key(k) for k in configs if k["backend"] == "native"}
    queued = {knob_key(k) for k in configs if k["backend"] == "queued"}
    assert len(native) == 9 and len(queued) == 9
    assert set(src.lookup) == native and set(src.partial) == queued
    assert {r["decode_path"] for r in src.lookup.values()} == {"eager", "graph:fused", "compiled"}
    for rec in src.lookup.values():
        assert rec["decode_path"].split(":")[0] == rec["decode_mode"] and rec["decode_tok_s"] > 0
    compiled = sorted((r for r in src.lookup.values() if r["decode_mode"] == "compiled"), key=lambda r: r["number"])
    assert compiled[0]["decode_compile_s"] > 10.0  # the first compile of the step, seconds on the GPU
    assert all(r["decode_compile_s"] < compiled[0]["decode_compile_s"] / 10 for r in compiled[1:])
    for rec in src.partial.values():
        assert set(rec["stage_s"]) == {"screen"} and rec["prefill_tok_s_ctx512"] > 0


def test_the_every_knob_gpu_grid_records_every_configuration_and_each_knob_ran_as_set() -> None:
    """benchmarks/data/xlstm350m_h200_every_knob (experiments/grid_350m_gpu_every_knob.toml on an H200 with
    Ray): every knob varies and every backend is there; every distinct configuration has a record, measured
    to the end or pruned with its screen's cost; and each knob shows in what ran, counted by the run: the
    step block's length is t_inner, the band width heads_per_band, tasks in flight the workers, side-stream
    tasks only with streams > 0, remote calls only for ray, chunk lengths the chunk size, and each measured
    native record decoded on the path its mode names."""
    src, spec, space = _grid(GRID.parent / "xlstm350m_h200_every_knob")
    assert all(len(dim.values()) >= 2 for dim in space.dims.values()) and len(space.dims) == 7
    configs = list(space.iter_configs())
    by_backend = {b: sum(k["backend"] == b for k in configs) for b in ("native", "queued", "ray")}
    assert by_backend == {"native": 6, "queued": 72, "ray": 24}
    assert {k["decode_mode"] for k in configs} == {"eager", "graph", "compiled"}
    assert {k["streams"] for k in configs if k["backend"] == "queued"} == {0, 2}
    assert min(spec.workload["context_lens"]) == 128
    keys = {knob_key(k) for k in configs}
    assert keys <= set(src.lookup) | set(src.partial), sorted(keys - set(src.lookup) - set(src.partial))[:3]
    for key in keys:
        rec = src.lookup.get(key) or src.partial[key]
        ran = rec["stats"]["ctx128"]
        assert rec["stage_s"]["screen"] > 0 and rec["prefill_tok_s_ctx128"] > 0, key
        if rec["backend"] == "native":
            assert ran["chunk_lengths"] == [min(128, rec["chunk_size"])], key
            if key in src.lookup:
                assert rec["stats"]["ctx2048"]["chunk_lengths"] == [rec["chunk_size"]], key
                assert rec["decode_path"].split(":")[0] == rec["decode_mode"] and rec["decode_tok_s"] > 0, key
            continue
        # step-block paths are hopeless here: pruned at 128 tokens (at the screen, or after the full measurement
        # where the screen ran on a busy machine and was not trusted), before any longer context or decode
        assert key in src.partial and set(rec["stage_s"]) <= {"screen", "prefill_ctx128"}, key
        assert ran["step_block_lengths"] == [rec["t_inner"]] and ran["band_widths"] == [rec["heads_per_band"]]
        assert ran["stream_tasks"] == (ran["tasks_dispatched"] if rec["backend"] == "queued" and rec["streams"] else 0)
        assert ran["ray_remote_calls"] == (ran["tasks_dispatched"] if rec["backend"] == "ray" else 0), key
        if rec["backend"] == "queued":
            assert ran["peak_in_flight"] == rec["workers"], key


def test_a_cold_start_leaves_the_first_trial_to_the_sampler(capsys) -> None:
    """On the every-knob grid the shipped CUDA configuration is the one reaching the target, so a replay
    that measures it first ends at its first trial for every seed; `--cold-start` measures nothing first,
    and one trial of random search over 288 grid points (16 of them that configuration) rarely gets there."""
    import json

    mod = _benchmark()
    data = str(GRID.parent / "xlstm350m_h200_every_knob")
    runs = {}
    for cold in (False, True):
        argv = ["--data", data, "--seeds", "6", "--samplers", "random", "--budget", "1", "--json"]
        assert mod.main(argv + (["--cold-start"] if cold else [])) == 0
        out = capsys.readouterr().out
        runs[cold] = json.loads(out[out.index("\n{") + 1:])["results"]["random/on"]
    assert runs[False]["failures"] == 0 and runs[False]["trials"] == [1] * 6
    assert runs[True]["failures"] >= 3
