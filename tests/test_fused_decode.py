"""The fused decode kernels (batch 1 and rows of B > 1) against float64 and against the plain step path.

On a CUDA machine the kernels run compiled; elsewhere, where Triton is installed, through Triton's CPU
interpreter (same kernel code, executed in NumPy). Without Triton these tests are skipped: the kernels
only ever run where Triton is.
"""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

from conftest import rel_err
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.kernels.mlstm import EPS, mlstm_step
from xlstm_tune.model.fused_decode import FusedDecodeStep
from xlstm_tune.model.xlstm import soft_cap

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = 1e-4


@pytest.fixture(scope="module")
def kernels():
    # without CUDA, conftest switched Triton's interpreter on for the whole session
    return importlib.import_module("xlstm_tune.kernels.decode_triton")


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


BATCHES = [1, 2, 3, 8, 16]  # batch 1 takes the GEMV kernel; 2..16 the row kernel (3: not a power of two)


def _gemv_cases(x, w, b, res, norm_w, n):
    """(kwargs, float64 result) of every prologue/epilogue, for rows x [B, K] (or one row [K])."""
    xd, wd, bd = x.double(), w.double(), b.double()
    rms = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * norm_w.double()
    return {
        "plain": (dict(), xd @ wd[:n].T),
        "rms+bias": (dict(rms_weight=norm_w, bias=b[:n]), rms @ wd[:n].T + bd[:n]),
        "residual": (dict(residual=res), res.double() + xd @ wd[:n].T),
        "swiglu+bias": (dict(rms_weight=norm_w, bias=b, swiglu=True),
                        torch.nn.functional.silu(rms @ wd[:n].T + bd[:n]) * (rms @ wd[n:].T + bd[n:])),
        "soft_cap": (dict(soft_cap=0.5), 0.5 * torch.tanh((xd @ wd[:n].T) / 0.5)),
    }


@pytest.mark.parametrize("n,k", [(40, 96), (300, 1000)])
def test_fused_gemv_prologues_and_epilogues_match_float64(kernels, seed, n, k):
    x, w, b = _rand(k), _rand(2 * n, k) / k ** 0.5, _rand(2 * n)
    for name, (kwargs, want) in _gemv_cases(x, w, b, _rand(n), 1 + 0.3 * _rand(k), n).items():
        out = torch.empty(n, device=DEVICE)
        kernels.fused_gemv(x, w if kwargs.get("swiglu") else w[:n], out, **kwargs)
        assert rel_err(out, want) < TOL, f"{name} seed={seed}"


def test_a_pinned_tile_is_what_runs_and_matches_float64(kernels, seed, monkeypatch):
    """A shape with a fixed tile (8 rows, 128 columns: K = 300 gives a ragged third tile) launches the
    kernel with that tile, counted per launch, and still matches float64 in every prologue and epilogue;
    a shape without one is autotuned (not counted)."""
    n, k = 40, 300
    x, w, b = _rand(k), _rand(2 * n, k) / k ** 0.5, _rand(2 * n)
    cases = _gemv_cases(x, w, b, _rand(n), 1 + 0.3 * _rand(k), n)
    def key(kw):  # the product's shape, prologue and epilogue codes
        epilogue = 1 if "residual" in kw else 2 if kw.get("swiglu") else 3 if "soft_cap" in kw else 0
        return n, k, int("rms_weight" in kw), epilogue
    keys = {key(kwargs) for kwargs, _ in cases.values()}
    for key in keys:
        monkeypatch.setitem(kernels.PINNED, key, (8, 128, 4, 3))
    before = kernels.pinned_launches.copy()
    for name, (kwargs, want) in cases.items():
        out = torch.empty(n, device=DEVICE)
        kernels.fused_gemv(x, w if kwargs.get("swiglu") else w[:n], out, **kwargs)
        assert rel_err(out, want) < TOL, f"{name} seed={seed}"
    assert {key: kernels.pinned_launches[key] - before[key] for key in keys} == {key: 1 for key in keys}
    other = torch.empty(n + 8, device=DEVICE)
    kernels.fused_gemv(x, _rand(n + 8, k), other)
    assert kernels.pinned_launches[(n + 8, k, 0, 0)] == before[(n + 8, k, 0, 0)] == 0


def test_the_tile_file_is_read_validated_and_written_per_device(tmp_path):
    from xlstm_tune.kernels.decode_tiles import TILES_FILE, load_tiles, save_tiles

    assert isinstance(load_tiles(TILES_FILE), dict)  # the shipped file parses and validates
    path = tmp_path / "tiles.json"
    save_tiles("GPU A", {(1024, 2752, 0, 1): (4, 1024, 8, 2)}, path)
    save_tiles("GPU B", {(3080, 1024, 1, 0): (8, 512, 4, 3)}, path)
    # a second model on GPU A: its shape added, A's other shape and B's kept; a retuned shape replaced
    save_tiles("GPU A", {(1024, 1024, 2, 1): (2, 1024, 4, 3), (1024, 2752, 0, 1): (8, 512, 4, 3)}, path)
    assert load_tiles(path) == {"GPU A": {(1024, 1024, 2, 1): (2, 1024, 4, 3), (1024, 2752, 0, 1): (8, 512, 4, 3)},
                                "GPU B": {(3080, 1024, 1, 0): (8, 512, 4, 3)}}
    for bad, why in [([4, 1000, 8, 2], "not a tile"), ([4, 1024], "expected"), ("x", "expected")]:
        path.write_text('{"devices": {"GPU A": {"N=1 K=2 prologue=0 epilogue=0": %s}}}' % __import__("json").dumps(bad))
        with pytest.raises(ValueError, match=why) as err:
            load_tiles(path)
        assert "GPU A" in str(err.value) and "\n" not in str(err.value)
    path.write_text('{"devices": {"GPU A": {"1024x2752": [4, 1024, 8, 2]}}}')
    with pytest.raises(ValueError, match="is not a shape"):
        load_tiles(path)


@pytest.mark.parametrize("batch,n,k", [(b, 40, 96) for b in BATCHES + [17]] + [(3, 70, 300)])
def test_fused_gemv_rows_match_float64(kernels, seed, batch, n, k):
    """Every row of x [B, K] against float64; the rows arrive strided (a slice of a wider buffer).
    17 rows: a second group of rows; K = 300: several K tiles with a ragged last one."""
    x = _rand(batch, k + 8)[:, 3:3 + k]
    w, b = _rand(2 * n, k) / k ** 0.5, _rand(2 * n)
    for name, (kwargs, want) in _gemv_cases(x, w, b, _rand(batch, n), 1 + 0.3 * _rand(k), n).items():
        out = torch.empty(batch, n, device=DEVICE)
        kernels.fused_gemv(x, w if kwargs.get("swiglu") else w[:n], out, **kwargs)
        assert rel_err(out, want) < TOL, f"{name} batch={batch} seed={seed}"


@pytest.mark.parametrize("batch", [2, 5])
def test_fused_gemv_rows_with_bf16_weights_round_the_rows_like_the_plain_linear(kernels, seed, batch):
    """Half weights: rows are rounded to bf16 (as the plain step's linear does), products summed in float32.
    Against float64 of the same rounded values the error is float32 summation only; against the unrounded
    rows it is bf16 rounding."""
    n, k = 40, 96
    x, w = _rand(batch, k), (_rand(n, k) / k ** 0.5).bfloat16()
    out = torch.empty(batch, n, device=DEVICE)
    kernels.fused_gemv(x, w, out)
    exact = x.double() @ w.double().T
    assert rel_err(out, exact) < 2 ** -7, f"seed={seed}"
    assert rel_err(out, x.bfloat16().double() @ w.double().T) < rel_err(out, exact) + 2 ** -8, f"seed={seed}"


@pytest.mark.parametrize("batch", [None, 2, 3])  # None: one row [K] (the GEMV kernel's own prologue)
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (3, 24)])
def test_fused_gemv_head_norm_gate_prologue_matches_float64(kernels, seed, heads, head_dim, batch):
    k, n = heads * head_dim, 50
    rows = () if batch is None else (batch,)
    h, norm_w, w = _rand(*rows, k) * 3 + 1, _rand(k), _rand(n, k)
    gate = _rand(*rows, k + 5)[..., 5:]  # a strided slice, like the output gate inside the projection
    hd = h.double().view(*rows, heads, head_dim)
    ln = (hd - hd.mean(-1, keepdim=True)) / (hd.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    x_eff = torch.sigmoid(gate.double()) * ln.flatten(-2) * norm_w.double()
    out = torch.empty(*rows, n, device=DEVICE)
    kernels.fused_gemv(h, w, out, head_norm=(norm_w, gate.contiguous() if batch is None else gate, head_dim), eps=1e-5)
    assert rel_err(out, x_eff @ w.double().T) < TOL, f"seed={seed}"


@pytest.mark.parametrize("batch,vocab", [(1, 5000), (3, 4096), (16, 100)])
def test_argmax_rows_picks_the_first_largest_value_like_torch(kernels, seed, batch, vocab):
    """Random rows, then rows whose largest value appears at two random places (one program's range or
    two): the first index wins, as with torch.argmax. Called twice on the same buffers, which the kernel
    must leave ready (its counters back at zero)."""
    buffers = kernels.argmax_buffers(batch, vocab, DEVICE)
    out = torch.empty(batch, 1, dtype=torch.int64, device=DEVICE)
    x = _rand(batch, vocab + 3)[:, :vocab]  # rows of a wider buffer: a row stride other than V
    kernels.argmax_rows(x, out, buffers)
    assert torch.equal(out, x.argmax(-1, keepdim=True)), f"seed={seed}"
    assert not buffers.sync.any(), "the argmax kernel leaves its counters at zero for the next call"
    ties = torch.randn(batch, vocab, device=DEVICE)
    for r in range(batch):
        first, second = sorted(torch.randperm(vocab)[:2].tolist())
        ties[r, first] = ties[r, second] = ties[r].max() + 1.0
    kernels.argmax_rows(ties, out, buffers)
    assert torch.equal(out, ties.argmax(-1, keepdim=True)), f"seed={seed}"
    assert not buffers.sync.any()


def _cell_case(kernels, heads, qk, v, batch):
    """The cell kernels on `batch` rows against `mlstm_step` (float32) on the same inputs."""
    rows = () if batch is None else (batch,)
    b = batch or 1
    proj = 2 * _rand(*rows, 2 * heads * qk + 2 * heads * v + 2 * heads)
    state = (_rand(b, heads, qk, v), _rand(b, heads, qk), _rand(b, heads, 1))
    q, k, vv, _, i, f = proj.view(b, -1).split([heads * qk, heads * qk, heads * v, heads * v, heads, heads], dim=-1)
    want_h, want_state = mlstm_step(q.reshape(b, heads, qk), k.reshape(b, heads, qk), vv.reshape(b, heads, v),
                                    soft_cap(i, 15.0).reshape(b, heads, 1), soft_cap(f, 15.0).reshape(b, heads, 1), state)
    got_state = tuple(t.clone() for t in state)
    h = torch.empty(*rows, heads * v, device=DEVICE)
    sync = kernels.cell_sync_buffer(b, heads, DEVICE)
    kernels.mlstm_decode_cell(proj, (heads * qk, heads * qk, heads * v, heads * v, heads, heads), heads, got_state,
                              sync, h, 15.0, EPS)
    assert not sync.any(), "the cell kernel leaves its counters at zero for the next step"
    return (h, want_h.reshape(h.shape)), list(zip(got_state, want_state))


@pytest.mark.parametrize("heads,qk,v", [(8, 256, 512), (4, 128, 256), (3, 24, 40)], ids=["7b-heads", "350m-heads", "odd"])
def test_decode_cell_matches_the_step_recurrence(kernels, seed, heads, qk, v):
    """The two cell kernels against `mlstm_step` (float32), on the presets' head shapes and an odd one."""
    (h, want_h), states = _cell_case(kernels, heads, qk, v, None)
    assert rel_err(h, want_h) < TOL, f"seed={seed}"
    for got, want in states:
        assert rel_err(got, want) < TOL, f"seed={seed}"


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_cell_rows_match_the_step_recurrence(kernels, seed, batch):
    """Every row has its own projection row and state slice: each row against the batched plain step."""
    (h, want_h), states = _cell_case(kernels, 3, 24, 40, batch)
    for r in range(batch):
        assert rel_err(h[r], want_h[r]) < TOL, f"row {r} seed={seed}"
        for got, want in states:
            assert rel_err(got[r], want[r]) < TOL, f"row {r} seed={seed}"


def _perturbed_model(name: str, dtype: str):
    """A preset with norm weights moved away from 1, so the norm prologues are really exercised."""
    m = load_model(name, device=DEVICE, dtype=dtype, runtime=RuntimeOptions(backend="native", compile=False))
    with torch.no_grad():
        for pname, p in m.net.named_parameters():
            if "norm" in pname and p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


def _advance(step, token, state, n):
    outs = []
    for _ in range(n):
        logits = step(token, state)
        outs.append(logits.clone())
        token = logits[:, -1].argmax(-1, keepdim=True)
    return outs


@pytest.mark.parametrize("batch", BATCHES)
def test_fused_step_matches_plain_step_in_float32(kernels, seed, batch):
    """`tiny` has an sLSTM block between mLSTM blocks: both kinds of block run inside the fused step.
    Rows start from different prompts, so a row reading another's state or projection would show."""
    m = _perturbed_model("tiny", "float32")
    ids = torch.randint(0, 256, (batch, 11), device=DEVICE)
    _, state = m(ids)
    plain_state = [tuple(t.clone() for t in b) for b in state]
    token = ids[:, -1:]
    steps = 4 if batch == 1 else 2  # the interpreter's time grows with the rows
    fused = _advance(FusedDecodeStep(m.net, kernels), token, state, steps)  # state advanced in place

    @torch.inference_mode()
    def plain(tok, _):
        nonlocal plain_state
        logits, plain_state = m.net.decode_step(tok, plain_state)
        return logits
    want = _advance(plain, token, None, steps)
    for step, (a, b) in enumerate(zip(fused, want)):
        for r in range(batch):
            assert rel_err(a[r], b[r]) < TOL, f"step {step} row {r} seed={seed}"
    for a, b in zip(state, plain_state):
        for x, y in zip(a, b):
            assert rel_err(x, y) < TOL or torch.equal(x, y), f"seed={seed}"
    m.close()


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_with_bf16_weights_is_no_less_accurate_than_the_plain_step(kernels, seed, batch):
    """Reference: the same bf16 weights run in float32 (exact copies). The fused kernels keep
    intermediates in float32 (rows of B > 1 are rounded to bf16 before each product, as the plain step
    does), so their error must not exceed the plain bf16 step's by more than noise."""
    m = _perturbed_model("xlstm-20m" if HAS_CUDA else "tiny", "bfloat16")
    ref = load_model("xlstm-20m" if HAS_CUDA else "tiny", device=DEVICE, dtype="float32",
                     runtime=RuntimeOptions(backend="native", compile=False))
    ref.net.load_state_dict({k: v.float() for k, v in m.net.state_dict().items()})
    ids = torch.randint(0, m.config.vocab_size, (batch, 9), device=DEVICE)
    token = torch.randint(0, m.config.vocab_size, (batch, 1), device=DEVICE)
    _, state = m(ids)
    _, ref_state = ref(ids)
    with torch.inference_mode():
        want, _ = ref.net.decode_step(token, ref_state)
        plain, _ = m.net.decode_step(token, [tuple(t.clone() for t in b) for b in state])
    fused = FusedDecodeStep(m.net, kernels)(token, state)
    assert rel_err(fused, want) <= max(2 * rel_err(plain, want), 1e-3), f"seed={seed}"
    m.close()
    ref.close()


@pytest.mark.skipif(not HAS_CUDA, reason="graph capture needs CUDA")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_graph_decode_captures_the_fused_step_for_batch_1_to_16(seed, batch):
    m = load_model("xlstm-20m", device="cuda", runtime=RuntimeOptions(backend="native", compile=False, decode_mode="eager"))
    prompt = torch.randint(0, 4096, (batch, 30), device="cuda")
    want, _ = m.generate(prompt, max_new_tokens=16)
    m.runtime = RuntimeOptions(backend="native", compile=False, decode_mode="graph")
    got, _ = m.generate(prompt, max_new_tokens=16)
    assert m.decode_path == "graph:fused"
    assert torch.equal(got, want), f"seed={seed}"
    wide = torch.randint(0, 4096, (17, 30), device="cuda")  # beyond the fused batches: the generic step
    m.runtime = RuntimeOptions(backend="native", compile=False, decode_mode="eager")
    want, _ = m.generate(wide, max_new_tokens=4)
    m.runtime = RuntimeOptions(backend="native", compile=False, decode_mode="graph")
    got, _ = m.generate(wide, max_new_tokens=4)
    assert m.decode_path == "graph:step"  # batch 17 captured the generic step, with torch's argmax
    assert torch.equal(got, want), f"seed={seed}"
    m.close()
