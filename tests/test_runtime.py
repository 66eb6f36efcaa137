"""Every backend × knob setting matches the canonical reference path, and every knob changes what runs."""
from __future__ import annotations

import itertools

import psutil
import pytest
import torch

from conftest import rel_err
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.errors import DeviceUnavailableError, UserError
from xlstm_tune.model.xlstm import lm_logits
from xlstm_tune.runtime.tiles import compiled

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", compile=False))
    yield m
    m.close()


# (backend, chunk_size, heads_per_band, t_inner, workers): ragged bands (3 of 4 heads), several t_inner,
# chunk sizes that do not divide the prompt, and one larger than the prompt.
GRID = [
    ("native", 8, 4, 1, 1), ("native", 5, 4, 1, 1), ("native", 64, 4, 1, 1),
    ("queued", 8, 3, 2, 2), ("queued", 6, 1, 3, 4), ("queued", 12, 4, 12, 1), ("queued", 64, 2, 4, 3),
]


@pytest.mark.parametrize("backend,chunk,hpb,t_inner,workers", GRID)
@pytest.mark.parametrize("seq", [3, 29])
def test_backends_match_canonical_reference(model, seed, backend, chunk, hpb, t_inner, workers, seq):
    ids = torch.randint(0, 256, (2, seq))
    ref, ref_state = model.reference_forward(ids)
    model.runtime = RuntimeOptions(backend=backend, chunk_size=chunk, heads_per_band=hpb, t_inner=t_inner,
                                   workers=workers, compile=False)
    out, state = model(ids)
    assert rel_err(out, ref) < TOL, f"seed={seed}"
    for block, ref_block in zip(state, ref_state):
        for got, want in zip(block, ref_block):
            assert rel_err(got, want) < TOL or torch.equal(got, want)


@pytest.mark.parametrize("backend", ["native", "queued"])
def test_state_carried_across_calls(model, seed, backend):
    ids = torch.randint(0, 256, (2, 41))
    ref, _ = model.reference_forward(ids)
    model.runtime = RuntimeOptions(backend=backend, chunk_size=8, heads_per_band=3, t_inner=2, compile=False)
    a, state = model(ids[:, :17])  # prefill
    b, state = model(ids[:, 17:30], state)  # second prefill continuing the state
    steps = []
    for t in range(30, 41):  # then single steps
        o, state = model(ids[:, t:t + 1], state)
        steps.append(o)
    assert rel_err(torch.cat([a, b, *steps], 1), ref) < TOL, f"seed={seed}"


def test_ray_backend_on_a_real_local_runtime(model, seed, private_ray):
    ids = torch.randint(0, 256, (2, 23))
    ref, _ = model.reference_forward(ids)
    model.runtime = RuntimeOptions(backend="ray", chunk_size=8, heads_per_band=3, t_inner=4, compile=False)
    model.stats.reset()
    out, state = model(ids)
    assert rel_err(out, ref) < TOL, f"seed={seed}"
    scheduler = model._cells.scheduler
    actors = list(scheduler.actors)
    assert len(actors) == 2  # bands of 3 + 1 heads: one actor each
    stats = model.stats.as_dict()
    # 23 tokens = chunks of 8, 8, 7: one remote call per chunk of each band, for 2 mLSTM + 1 sLSTM layers
    assert stats["ray_remote_calls"] == stats["tasks_dispatched"] == stats["chunks_run"] == 3 * 2 * 3
    assert stats["chunk_lengths"] == [7, 8] and stats["band_widths"] == [1, 3]
    # inside the actors: 4 + 4 steps per chunk of 8, 4 + 3 for the tail, per band and layer
    assert stats["kernel_paths"] == {"mlstm.step_block.eager": 2 * 2 * 6, "slstm.step_block.eager": 2 * 6}
    more, _ = model(ids[:, :5], state)  # a second call reuses the same actors
    assert scheduler.actors == actors
    # the private runtime (our child processes) listens on loopback only
    listening = [c.laddr for p in psutil.Process().children(recursive=True)
                 for c in _connections(p) if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening), listening
    model.runtime = RuntimeOptions(backend="native", compile=False)  # hands the actors back


def _connections(process):
    try:
        return process.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that just exited
        return []


def _run_stats(model, ids, **knobs):
    model.runtime = RuntimeOptions(compile=False, **knobs)
    model.stats.reset()
    model(ids)
    return model.stats.as_dict()


def test_every_knob_changes_what_runs(model):
    ids = torch.randint(0, 256, (1, 48))
    base = dict(backend="queued", chunk_size=16, heads_per_band=2, t_inner=4, workers=2)
    s0 = _run_stats(model, ids, **base)
    # 48 tokens, 2 bands, 3 cell layers: a task is one chunk of one band
    assert s0["tasks_dispatched"] == s0["chunks_run"] == 3 * 2 * 3 and s0["chunk_lengths"] == [16]
    # chunk_size: half the chunk, twice the tasks; with t_inner fixed the step-block calls stay the same
    s_chunk = _run_stats(model, ids, **{**base, "chunk_size": 8})
    assert s_chunk["tasks_dispatched"] == s_chunk["chunks_run"] == 2 * s0["tasks_dispatched"]
    assert s_chunk["chunk_lengths"] == [8] and s_chunk["kernel_paths"] == s0["kernel_paths"]
    # t_inner: fewer steps per call -> more calls, same tasks
    s_t = _run_stats(model, ids, **{**base, "t_inner": 2})
    assert s_t["kernel_paths"]["mlstm.step_block.eager"] == 2 * s0["kernel_paths"]["mlstm.step_block.eager"]
    assert s_t["step_block_lengths"] == [2] and s_t["tasks_dispatched"] == s0["tasks_dispatched"]
    # heads_per_band: more bands -> more tasks
    s_h = _run_stats(model, ids, **{**base, "heads_per_band": 1})
    assert s_h["tasks_dispatched"] == 2 * s0["tasks_dispatched"] and s_h["band_widths"] == [1]
    # workers: how many chunk tasks the dispatcher keeps in flight at once (4 bands here)
    for workers in (1, 3):
        s_w = _run_stats(model, ids, **{**base, "heads_per_band": 1, "workers": workers})
        assert s_w["peak_in_flight"] == workers and s_w["tasks_dispatched"] == s_h["tasks_dispatched"]
    # backend: a different kernel path
    s_n = _run_stats(model, ids, backend="native", chunk_size=16)
    assert "mlstm.chunkwise.eager" in s_n["kernel_paths"] and "mlstm.step_block.eager" not in s_n["kernel_paths"]
    assert s_n["cell_products"] == ["ieee"]  # TF32 cell products are for bf16/fp16 models on CUDA only
    # native chunk_size reaches the chunkwise tile: a chunk larger than the prompt is one chunk per layer
    s_n2 = _run_stats(model, ids, backend="native", chunk_size=64)
    assert s_n2["chunks_run"] == 3 and s_n["chunks_run"] == 3 * 3 and s_n2["chunk_lengths"] == [48]
    # decode_mode: the step that ran (compiled decode is counted in the compiled test below)
    model.runtime = RuntimeOptions(compile=False, decode_mode="eager")
    _, state = model(ids)
    model.stats.reset()
    model(ids[:, -1:], state)
    assert model.stats.as_dict()["decode_paths"] == {"eager": 1}


def test_compiled_step_block_matches_and_is_counted(model, seed):
    """One small compiled run (torch.compile on CPU costs ~25 s on first use: kept to one test).

    Four single-head bands on four threads hit the same uncompiled shape at once: the first call per
    shape must be serialised (dynamo cannot trace one function from two threads).
    """
    ids = torch.randint(0, 256, (1, 12))
    ref, _ = model.reference_forward(ids)
    head = compiled("lm_logits", lm_logits)  # the process's shared compiled head: its calls count what ran
    before = head.calls
    model.runtime = RuntimeOptions(backend="queued", chunk_size=4, heads_per_band=1, t_inner=4, workers=4, compile=True,
                                   decode_mode="compiled")
    out, state = model(ids)
    assert rel_err(out, ref) < TOL, f"seed={seed}"
    stats = model.stats.as_dict()
    assert stats["compiled_calls"] > 0 and stats["eager_calls"] == 0
    assert head.calls == before + 1  # the final norm, head and soft cap ran compiled, once per prefill
    # compiled decode equals eager decode
    token = ids[:, -1:]
    model.stats.reset()
    compiled_logits, _ = model(token, state)
    assert model.stats.as_dict()["decode_paths"] == {"compiled": 1}
    model.runtime = RuntimeOptions(backend="queued", compile=False, decode_mode="eager")
    eager_logits, _ = model(token, state)
    assert rel_err(compiled_logits, eager_logits) < TOL
    model(ids)  # an uncompiled prefill and the decode steps above never call the compiled head
    assert head.calls == before + 1


def test_streams_and_graph_unavailable_on_cpu_fail_clearly(model):
    with pytest.raises(DeviceUnavailableError, match="streams"):
        model.runtime = RuntimeOptions(backend="queued", streams=2, compile=False)
    with pytest.raises(DeviceUnavailableError, match="graph"):
        model.runtime = RuntimeOptions(decode_mode="graph", compile=False)
    with pytest.raises(UserError, match="heads_per_band=5"):
        model.runtime = RuntimeOptions(backend="queued", heads_per_band=5)
    # the failed assignments left the previous runtime in place
    out, _ = model(torch.randint(0, 256, (1, 4)))
    assert out.shape == (1, 4, 256)


@pytest.mark.parametrize("bad,fragment", [
    (dict(t_inner=3, chunk_size=8), "t_inner=3 must divide chunk_size=8"),
    (dict(backend="warp"), "unknown backend"),
    (dict(decode_mode="turbo"), "unknown decode_mode"),
    (dict(workers=0), "workers must be >= 1"),
    (dict(chunk_size="x"), "chunk_size must be an integer"),
])
def test_options_validation_is_one_line(bad, fragment):
    with pytest.raises(UserError) as info:
        RuntimeOptions(**bad)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_env_round_trip_and_seed_names():
    opts = RuntimeOptions(backend="ray", chunk_size=48, heads_per_band=2, workers=6, t_inner=8, streams=0, decode_mode="compiled")
    env = opts.to_env()
    assert env["XLSTM_CHUNKWISE_BACKEND"] == "chunkwise--ray_compiled_steps"
    assert RuntimeOptions.from_env(env) == opts
    for spelling in ("queued_compiled_steps", "chunkwise--queued_compiled_steps", "queued", "QUEUED"):
        assert RuntimeOptions.from_env({"XLSTM_CHUNKWISE_BACKEND": spelling}).backend == "queued"
    with pytest.raises(UserError, match="bad environment setting"):
        RuntimeOptions.from_env({"XLSTM_T_INNER": "5"})
    # precedence: CLI > best.json > environment > config > default
    merged = RuntimeOptions.merged(cli={"workers": 2}, environ={"XLSTM_MPS_WORKERS": "7", "XLSTM_CHUNK_SIZE": "16"},
                                   config={"chunk_size": 64, "workers": 9, "t_inner": 2})
    assert (merged.workers, merged.chunk_size, merged.t_inner) == (2, 16, 2)


def _scale_and_shift(x: torch.Tensor) -> torch.Tensor:
    return x * 3 + 1


def test_compile_gate_keeps_warm_calls_out_of_a_running_compile():
    """Dynamo's FX-tracing flag is process-wide: a warm call that starts while another thread traces raises.
    The gate makes warm calls wait for a running compile, and a compile wait for running warm calls."""
    import threading

    from xlstm_tune.runtime.tiles import CompiledKernel, CompileGate

    gate = CompileGate()
    kernel = CompiledKernel(_scale_and_shift, gate=gate)
    x = torch.randn(5)
    assert torch.equal(kernel(x), x * 3 + 1)  # compiles this signature
    done = threading.Event()
    result: list[torch.Tensor] = []

    def warm_call() -> None:
        result.append(kernel(x))
        done.set()

    with gate.compiling():  # as if another thread were tracing a new signature
        worker = threading.Thread(target=warm_call)
        worker.start()
        # the warm call is held at the gate while the compile runs
        assert gate.wait_until(lambda st: st["warm_waiting"] == 1, 10)
        assert not done.is_set() and gate.state()["running"] == 0
    assert done.wait(10) and torch.equal(result[0], x * 3 + 1)
    worker.join()

    entered, release, compiled = threading.Event(), threading.Event(), threading.Event()

    def long_warm_call() -> None:
        with gate.warm_call():
            entered.set()
            release.wait(10)

    def compile_() -> None:
        with gate.compiling():
            compiled.set()

    late = threading.Event()

    def late_warm_call() -> None:
        with gate.warm_call():
            late.set()

    threads = [threading.Thread(target=long_warm_call), threading.Thread(target=compile_),
               threading.Thread(target=late_warm_call)]
    threads[0].start()
    assert entered.wait(10)
    threads[1].start()
    # a compile waits for warm calls in flight
    assert gate.wait_until(lambda st: st["compiles_waiting"] == 1, 10) and not compiled.is_set()
    threads[2].start()
    # and a warm call arriving meanwhile queues behind the waiting compile
    assert gate.wait_until(lambda st: st["warm_waiting"] == 1, 10) and not late.is_set()
    assert gate.state() == {"running": 1, "compiling": 0, "compiles_waiting": 1, "warm_waiting": 1}
    release.set()
    assert compiled.wait(10) and late.wait(10)
    for t in threads:
        t.join()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_logits_cap_in_place_is_the_out_of_place_formula_bit_for_bit(seed, dtype):
    """lm_logits caps the fresh logits in place: the same values as cap * tanh(logits / cap), exactly, and
    none of its inputs touched (with float32 weights the product's output is the tensor being capped)."""
    from xlstm_tune.model.xlstm import linear, rms_norm

    x = torch.randn(2, 7, 16).to(dtype)
    norm = (torch.rand(16) + 0.5, None, 1e-6, True)
    w = (torch.randn(300, 16) / 4).to(dtype)
    x0, w0 = x.clone(), w.clone()
    got = lm_logits(x, norm, w, 30.0, None)
    plain = linear(rms_norm(x, *norm).to(dtype), w, None, None).float()
    assert got.dtype == torch.float32 and torch.equal(got, 30.0 * torch.tanh(plain / 30.0)), f"seed={seed}"
    assert torch.equal(lm_logits(x, norm, w, None, None), plain)
    assert torch.equal(x, x0) and torch.equal(w, w0)
