"""The prefill_graph switch on the CPU, which has no device graphs: refused at once with one line, never
ignored; launched prefills are counted as such, and the harness's path check tells the two
apart. The replays themselves run in tests/test_cuda_paths.py (CUDA)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.bench.harness import BenchSettings, PathMismatchError, bench_prefill, verify_stats
from xlstm_tune.bench.workload import describe_model
from xlstm_tune.errors import DeviceUnavailableError
from xlstm_tune.runtime.best_file import read_best
from xlstm_tune.runtime.prefill_graph import _one_pass
from xlstm_tune.runtime.settings import SETTING_ENV_VARS, RuntimeSettings, resolve_runtime, settings_from_mapping
from xlstm_tune.tracking.best_export import build_best, export_best

SWITCH = SETTING_ENV_VARS["prefill_graph"]


def test_the_switch_is_a_setting_off_by_default_in_every_source() -> None:
    assert RuntimeSettings().prefill_graph is False and SWITCH == "XLSTM_PREFILL_GRAPH"
    assert RuntimeSettings(prefill_graph=True).to_env()[SWITCH] == "1"
    _, from_env = resolve_runtime(environ={SWITCH: "true"})
    assert from_env.prefill_graph is True
    assert settings_from_mapping({"prefill_graph": "on"}, "[runtime]").prefill_graph is True
    with pytest.raises(Exception) as exc:
        resolve_runtime(environ={SWITCH: "sometimes"})
    assert "prefill_graph" in str(exc.value) and "\n" not in str(exc.value)


def test_apply_refuses_it_before_setting_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLSTM_FUSED_DECODE", "keep")  # apply would overwrite it: it must not get that far
    monkeypatch.delenv(SWITCH, raising=False)
    threads = torch.get_num_threads()
    with pytest.raises(DeviceUnavailableError) as exc:
        RuntimeSettings(prefill_graph=True, threads=1).apply("cpu")
    msg = str(exc.value)
    assert "\n" not in msg and "prefill_graph needs device graphs" in msg and "XLSTM_PREFILL_GRAPH=0" in msg
    assert os.environ["XLSTM_FUSED_DECODE"] == "keep" and SWITCH not in os.environ
    assert torch.get_num_threads() == threads


def test_the_device_layer_has_no_graph_pool_for_the_cpu() -> None:
    from xlstm_tune.runtime.device import capture_graph, graph_memory_pool

    with pytest.raises(DeviceUnavailableError, match="only CUDA has them"):
        graph_memory_pool("cpu")
    ran = []
    with pytest.raises(DeviceUnavailableError, match="only CUDA has them"):
        capture_graph("cpu", lambda: ran.append(1), warmup=1, pool=None, capture_error_mode="thread_local")
    assert ran == []  # refused before running anything


def test_a_model_refuses_it_at_the_prefill_and_counts_launched_prefills(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", chunk_size=8, compile=False))
    try:
        ids = torch.randint(0, 256, (1, 20))
        logits, _ = model(ids)
        model(ids[:, :5])
        assert model.stats.as_dict()["prefill_paths"] == {"call": 2}
        monkeypatch.setenv(SWITCH, "1")
        with pytest.raises(DeviceUnavailableError, match="prefill_graph needs device graphs"):
            model(ids)
        monkeypatch.setenv(SWITCH, "0")
        again, _ = model(ids)
        assert torch.equal(again, logits)
    finally:
        model.close()


def _bench_stats(options: RuntimeOptions) -> dict:
    model = load_model("tiny", device="cpu", runtime=options)
    try:
        settings = BenchSettings(warmup=0, repeats=2, max_rounds=1, busy_retries=0)
        return bench_prefill(model, torch.randint(0, 256, (1, 24)), settings, model_info=describe_model("tiny")).stats
    finally:
        model.close()


def test_the_harness_checks_which_prefill_path_ran() -> None:
    native = RuntimeOptions(backend="native", chunk_size=8, compile=False)
    stats = _bench_stats(native)
    assert stats["prefill_paths"] == {"call": 3}  # the first call and two repeats
    verify_stats(native, stats, has_slstm=True, prefill_graph=False)
    with pytest.raises(PathMismatchError, match="graph:replay"):
        verify_stats(native, stats, has_slstm=True, prefill_graph=True)  # asked for graphs, launched
    replayed = {**stats, "prefill_paths": {"graph:capture": 1, "graph:replay": 3}}
    with pytest.raises(PathMismatchError, match="call"):
        verify_stats(native, replayed, has_slstm=True, prefill_graph=False)
    # the switch is for native: the queued backend launches its calls with it on or off
    queued = RuntimeOptions(backend="queued", chunk_size=8, t_inner=4, workers=2, compile=False)
    verify_stats(queued, _bench_stats(queued), has_slstm=True, prefill_graph=True)


def test_one_replays_counts_are_one_forwards_counts() -> None:
    """A capture runs the forward twice (warm-up, recording), counted apart from what ran before: a replay
    must add one forward's counts and only its own shape's chunk lengths; the totals keep everything."""
    model = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", chunk_size=8, compile=False))
    try:
        stats = model.stats
        model(torch.randint(0, 256, (1, 3)))  # another shape first: chunk lengths {3}
        earlier = stats.as_dict()
        stats.reset()
        ids = torch.randint(0, 256, (1, 21))
        model.net.forward_tokens(ids, None, model._cells)
        single = stats.as_dict()
        stats.reset()
        stats.merge(earlier)

        def two_passes() -> str:
            for _ in range(2):
                model.net.forward_tokens(ids, None, model._cells)
            return "done"

        result, counted = stats.counted_apart(two_passes)
        total = stats.as_dict()
    finally:
        model.close()
    assert result == "done"
    one = _one_pass(counted)
    assert one["kernel_paths"] == single["kernel_paths"] and one["chunk_lengths"] == single["chunk_lengths"] == [5, 8]
    for key in ("chunks_run", "tokens_prefilled", "eager_calls", "compiled_calls", "tasks_dispatched"):
        assert one[key] == single[key] and (key != "chunks_run" or one[key] > 0), key
    assert one["prefill_paths"] == {}
    assert total["chunk_lengths"] == [3, 5, 8] and total["prefill_paths"] == {"call": 1}
    assert total["chunks_run"] == earlier["chunks_run"] + 2 * single["chunks_run"]
    assert total["kernel_paths"] == {k: earlier["kernel_paths"].get(k, 0) + 2 * v for k, v in single["kernel_paths"].items()}


def test_best_json_and_cli_carry_the_switch(spawn, tmp_path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    for cmd in (["run", "--prompt", "hi", "--new-tokens", "2"], ["bench", "--prefill-len", "16", "--new-tokens", "2"],
                ["study", "--n-trials", "1"]):
        proc = spawn.cli(*cmd, "--model", "tiny", "--device", "cpu", "--no-compile", "--prefill-graph", timeout=120,
                         cwd=work)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "prefill_graph needs device graphs (CUDA)" in lines[0] and "Traceback" not in proc.stderr
    assert list(work.iterdir()) == []  # the study refused before creating its storage or tracking store
    knobs = dict(backend="native", chunk_size=8, heads_per_band=4, workers=1, t_inner=4, streams=0, decode_mode="eager")
    data = build_best([{"context_len": 16, "knobs": knobs, "metrics": {}, "fidelity": {"passed": True}}],
                      {"device_name": "x", "model_id": "tiny", "model_config_hash": "h", "study_name": "s",
                       "trial_number": 0, "mlflow_run_id": None}, {"compile": True, "prefill_graph": True})
    best = read_best(export_best(tmp_path / "best.json", data))
    assert best["runtime"]["prefill_graph"] is True
    _, settings = resolve_runtime(best=best)
    assert settings.prefill_graph is True


def test_the_benchmark_script_says_it_needs_cuda(capsys) -> None:
    script = load_benchmark("prefill_graph")
    assert script.main(["--model", "tiny", "--lengths", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefill_graph.py: device graphs need CUDA") and "\n" not in err
    assert script.main(["--lengths", "0,x"]) == 2
    assert "--lengths must be positive integers" in capsys.readouterr().err


def test_a_spec_reads_the_switch_and_studies_from_before_it_still_resume() -> None:
    from xlstm_tune.errors import UserError
    from xlstm_tune.study.spec import parse_spec

    space = {"space": {"chunk_size": [16, 32]}}
    assert parse_spec(space, "x.toml").runtime["prefill_graph"] is False
    assert "prefill_graph" not in parse_spec(space, "x.toml").measurement_identity()["runtime"]
    on = parse_spec({**space, "runtime": {"prefill_graph": True}}, "x.toml")
    assert on.runtime["prefill_graph"] is True and on.measurement_identity()["runtime"]["prefill_graph"] is True
    with pytest.raises(UserError, match="prefill_graph"):
        parse_spec({**space, "runtime": {"prefill_graph": "maybe"}}, "x.toml")


def test_the_gpu_experiments_measure_the_graph_path_on_cuda_only() -> None:
    """experiments/xlstm_350m.toml (device auto) turns prefill graphs on for CUDA alone, so the same file still
    runs on a CPU or MPS; xlstm_7b_gpu.toml (CUDA) turns them on outright. What a study measures is what its
    best.json carries, and best.json outranks configs/cuda.toml."""
    from xlstm_tune.study.spec import apply_device_overrides, load_spec

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    spec = load_spec(experiments / "xlstm_350m.toml")
    assert apply_device_overrides(spec, "cuda").runtime["prefill_graph"] is True
    for other in ("cpu", "mps"):
        assert apply_device_overrides(spec, other).runtime["prefill_graph"] is False
    assert load_spec(experiments / "xlstm_7b_gpu.toml").runtime["prefill_graph"] is True
