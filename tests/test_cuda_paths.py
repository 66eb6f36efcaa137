"""CUDA-only paths: device streams for the queued backend, captured decode graphs, compiled kernels on GPU.

These run on a machine with an NVIDIA GPU (`python -m pytest tests/test_cuda_paths.py`); on CPU-only
machines the same paths are covered by the clear-error tests in test_runtime.py.
"""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.kernels.reference import mlstm_quadratic_fp64
from xlstm_tune.runtime.tiles import RunStats, TileConfig, mlstm_chunk_tile

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny", device="cuda", runtime=RuntimeOptions(backend="native", compile=False))
    yield m
    m.close()


@pytest.mark.parametrize("options", [
    RuntimeOptions(backend="native", chunk_size=16, compile=True),
    RuntimeOptions(backend="queued", chunk_size=8, t_inner=4, heads_per_band=3, workers=2, streams=2, compile=False),
    RuntimeOptions(backend="queued", chunk_size=8, t_inner=4, heads_per_band=1, workers=4, streams=4, compile=True),
], ids=["native-compiled", "queued-streams", "queued-streams-compiled"])
def test_cuda_backends_match_reference(model, seed, options):
    ids = torch.randint(0, 256, (2, 45), device="cuda")
    ref, _ = model.reference_forward(ids)
    model.runtime = options
    out, state = model(ids)
    assert rel_err(out, ref) < TOL, f"seed={seed}"


@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_decode_modes_match_eager_and_generate_the_same_tokens(model, seed, mode):
    prompt = torch.randint(0, 256, (2, 20), device="cuda")
    model.runtime = RuntimeOptions(backend="native", compile=False, decode_mode="eager")
    want_tokens, want_state = model.generate(prompt, max_new_tokens=24)
    _, state = model(prompt)
    want_logits, _ = model(prompt[:, -1:], state)
    model.runtime = RuntimeOptions(backend="native", compile=False, decode_mode=mode)
    _, state = model(prompt)
    logits, _ = model(prompt[:, -1:], state)
    assert rel_err(logits, want_logits) < TOL, f"seed={seed}"
    tokens, got_state = model.generate(prompt, max_new_tokens=24)
    assert torch.equal(tokens, want_tokens)
    for a, b in zip(got_state, want_state):
        for x, y in zip(a, b):
            assert rel_err(x, y) < TOL or torch.equal(x, y)


def test_bf16_model_on_cuda_keeps_float32_state_and_tracks_reference(seed):
    """Reference: the same bf16 weights run in float32 (exact copies). The compiled bf16 path rounds at other
    points than the eager canonical bf16 path (fused kernels keep intermediates in float32), so it is held to
    being no further from float32 than the canonical bf16 path, up to a factor for rounding noise."""
    m = load_model("xlstm-20m", device="cuda", dtype="bfloat16",
                   runtime=RuntimeOptions(backend="native", chunk_size=64, compile=True, decode_mode="graph"))
    ref32 = load_model("xlstm-20m", device="cuda", dtype="float32", runtime=RuntimeOptions(backend="native", compile=False))
    ref32.net.load_state_dict({k: v.float() for k, v in m.net.state_dict().items()})
    ids = torch.randint(0, 4096, (1, 300), device="cuda")
    want, _ = ref32.reference_forward(ids)
    canonical, _ = m.reference_forward(ids)
    out, state = m(ids)
    assert all(t.dtype == torch.float32 for block in state for t in block)
    assert rel_err(out, want) <= max(2 * rel_err(canonical, want), 1e-2), f"seed={seed}"
    m.close()
    ref32.close()


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_chunk_tile_runs_tf32_products_within_bound_and_float32_stays_ieee(seed, compile, monkeypatch):
    """bf16 inputs at the 7B head shape (K 256, V 512; 300 steps: two chunks of 128 and a tail), against float64
    on the same bf16 values. TF32 must stay far below the model's own bf16 rounding, measurably differ from
    IEEE products (else it did not run), and leave the process's matmul precision as it found it."""
    H, S, K, V = 2, 300, 256, 512
    q, k = torch.rand(1, H, S, K, device="cuda"), torch.rand(1, H, S, K, device="cuda")  # positive: no q.n cancellation
    v = torch.randn(1, H, S, V, device="cuda")
    i, f = torch.randn(1, H, S, device="cuda") * 3, torch.randn(1, H, S, device="cuda") * 3 + 2
    low = [x.bfloat16() for x in (q, k, v, i, f)]
    state = (torch.randn(1, H, K, V, device="cuda"), torch.rand(1, H, K, device="cuda"), torch.randn(1, H, 1, device="cuda"))
    ref_h, ref_state = mlstm_quadratic_fp64(*low, state)
    cfg = TileConfig(chunk_size=128, t_inner=16, compile=compile)
    prior = torch.backends.cuda.matmul.fp32_precision

    def run(tensors):
        stats = RunStats()
        h, new_state = mlstm_chunk_tile(*tensors, state, cfg, stats)
        return h, new_state, stats.as_dict()["cell_products"]

    h_tf32, st_tf32, ran = run(low)
    assert ran == ["tf32"] and torch.backends.cuda.matmul.fp32_precision == prior
    monkeypatch.setenv("XLSTM_TF32_CELL", "0")
    h_ieee, st_ieee, ran_off = run(low)
    assert ran_off == ["ieee"]
    err_tf32, err_ieee = rel_err(h_tf32, ref_h), rel_err(h_ieee, ref_h)
    assert err_ieee < TOL and err_tf32 < 2e-3 and err_tf32 > 3 * err_ieee, f"seed={seed} {err_tf32=} {err_ieee=}"
    assert all(t.dtype == torch.float32 for t in st_tf32)
    assert all(rel_err(a, b) < 2e-3 for a, b in zip(st_tf32, ref_state)), f"seed={seed}"
    monkeypatch.delenv("XLSTM_TF32_CELL")
    assert run([x.float() for x in low])[2] == ["ieee"]  # float32 models never get TF32


@pytest.mark.parametrize("n,k", [(12304, 4096), (100, 37), (4096, 10944)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gemv_matches_float64(seed, n, k, dtype):
    from xlstm_tune.kernels.gemv_triton import gemv

    w = torch.randn(n, k, device="cuda", dtype=dtype)
    x = torch.randn(1, 1, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    ref = x.double().view(1, k) @ w.double().T + b.double()
    y = gemv(x, w, b)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 output rounding
    assert rel_err(y.view(1, n), ref) < tol, f"seed={seed}"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_prefill_graph_replays_each_prompt_with_its_own_answer(model, seed, compile, monkeypatch):
    """XLSTM_PREFILL_GRAPH=1: the first prefill of a shape captures, later ones replay. Each prompt must
    get its own logits and state (not the captured prompt's), match the launched prefill and the float64-
    tracking canonical path, and the caller's results must survive the next replay (they are copies)."""
    options = RuntimeOptions(backend="native", chunk_size=16, compile=compile)
    model.runtime = options
    prompts = [torch.randint(0, 256, (2, 45), device="cuda") for _ in range(3)]
    launched = [model(p) for p in prompts]
    assert model.stats.as_dict()["prefill_paths"] == {"call": 3}
    monkeypatch.setenv("XLSTM_PREFILL_GRAPH", "1")
    model.runtime = options
    replayed = [model(p) for p in prompts]
    first_logits = replayed[0][0].clone()
    again, _ = model(prompts[1])  # a replay after the others: replayed[0] must not change under it
    assert torch.equal(replayed[0][0], first_logits)
    assert model.stats.as_dict()["prefill_paths"] == {"graph:capture": 1, "graph:replay": 4}
    for p, (want, want_state), (got, got_state) in zip(prompts, launched, replayed):
        assert rel_err(got, want) < TOL, f"seed={seed}"
        assert rel_err(got, model.reference_forward(p)[0]) < TOL, f"seed={seed}"
        for a, b in zip(got_state, want_state):
            for x, y in zip(a, b):
                assert rel_err(x, y) < TOL or torch.equal(x, y)
    assert rel_err(again, launched[1][0]) < TOL
    assert not torch.equal(replayed[0][0], replayed[1][0])


def test_prefill_graph_continues_a_state_and_counts_the_kernels_of_every_replay(model, seed, monkeypatch):
    """A prefill from a given state (a second prompt segment) captures its own graph; the kernel counts of
    a replay are those of a launched prefill, so the harness's path checks hold; at most `max_graphs`
    shapes are kept, the least recently used dropped first."""
    options = RuntimeOptions(backend="native", chunk_size=16, compile=True)
    model.runtime = options
    head, tail = torch.randint(0, 256, (1, 40), device="cuda"), torch.randint(0, 256, (1, 24), device="cuda")
    _, state = model(head)
    want, want_state = model(tail, state)
    model.stats.reset()
    model(tail, state)
    launched_counts = model.stats.as_dict()
    monkeypatch.setenv("XLSTM_PREFILL_GRAPH", "1")
    model.runtime = options
    _, state_g = model(head)
    got, got_state = model(tail, state_g)
    assert rel_err(got, want) < TOL, f"seed={seed}"
    assert all(rel_err(x, y) < TOL or torch.equal(x, y) for a, b in zip(got_state, want_state) for x, y in zip(a, b))
    model.stats.reset()
    model(tail, state_g)
    replay = model.stats.as_dict()
    assert replay["prefill_paths"] == {"graph:replay": 1}
    for key in ("kernel_paths", "chunks_run", "tokens_prefilled", "chunk_lengths", "cell_products"):
        assert replay[key] == launched_counts[key], key
    assert len(model._prefill_graphs) == 2
    model.runtime = options.replace(compile=False)  # new shapes below: no compile per shape
    model(head)
    graphs = model._prefill_graphs
    for n in range(1, graphs.max_graphs + 1):  # more shapes than are kept
        model(torch.randint(0, 256, (1, 16 + n), device="cuda"))
    assert len(graphs) == graphs.max_graphs
    assert graphs._key(head, None) not in graphs._graphs  # the oldest shape went first


def test_prefill_graphs_in_segments_capture_each_piece_shape_once_and_keep_them_all(model, seed, monkeypatch):
    """XLSTM_PREFILL_SEGMENT=8 with prefill graphs: five prompts run as pieces of 8, 4, 2 and 1 tokens, five
    piece shapes (with and without a starting state), one more than a process keeps by default. Each shape
    is captured once and replayed after (none evicted: the graphs keep shape_bound(8)), and every prompt's
    logits and state match the whole prompt launched."""
    from xlstm_tune.runtime.prefill_segments import piece_lengths, shape_bound

    options = RuntimeOptions(backend="native", chunk_size=4, compile=False)
    model.runtime = options
    prompts = [torch.randint(0, 256, (1, n), device="cuda") for n in (21, 13, 30, 8, 27)]
    want = [model(p) for p in prompts]
    monkeypatch.setenv("XLSTM_PREFILL_GRAPH", "1")
    monkeypatch.setenv("XLSTM_PREFILL_SEGMENT", "8")
    model.runtime = options
    model.stats.reset()
    got = [model(p) for p in prompts]
    pieces = [piece_lengths(p.shape[1], 8) for p in prompts]
    shapes = {(n, i > 0) for lengths in pieces for i, n in enumerate(lengths)}
    assert len(shapes) == 5
    paths = model.stats.as_dict()["prefill_paths"]
    assert paths == {"graph:capture": len(shapes), "graph:replay": sum(map(len, pieces))}  # a capture replays too
    assert len(model._prefill_graphs) == len(shapes) <= shape_bound(8)
    for (w, w_state), (g, g_state) in zip(want, got):
        assert rel_err(g, w) < TOL, f"seed={seed}"
        assert all(rel_err(x, y) < TOL or torch.equal(x, y) for a, b in zip(g_state, w_state) for x, y in zip(a, b))


def test_a_prefill_that_cannot_be_captured_is_a_one_line_error_and_nothing_is_kept(seed):
    """A forward that fails while it is being captured (as an operation that capture does not allow does)
    makes the switch's error, naming the shape and the fix; no graph is kept, and the same object still
    captures a forward that can be captured. (The failure is raised by the forward itself: a real illegal
    call inside a capture could leave this process's CUDA context unusable for the tests after it.)"""
    from xlstm_tune.errors import DeviceUnavailableError
    from xlstm_tune.runtime.prefill_graph import PrefillGraphs

    def refuses_capture(ids, state):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return ids.float() * 3, []

    graphs = PrefillGraphs(refuses_capture, torch.device("cuda"), RunStats())
    ids = torch.randint(0, 256, (1, 8), device="cuda")
    with pytest.raises(DeviceUnavailableError) as exc:
        graphs(ids)
    assert "\n" not in str(exc.value) and "(1, 8)" in str(exc.value) and "XLSTM_PREFILL_GRAPH=0" in str(exc.value)
    assert len(graphs) == 0
    graphs.forward = lambda i, s: (i.float() * 2, [])
    out, _ = graphs(ids)
    assert torch.equal(out, ids.float() * 2) and len(graphs) == 1
