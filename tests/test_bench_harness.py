"""bench.harness and bench.workload on the `tiny` model (CPU, eager kernels: a few seconds)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from xlstm_tune import RuntimeOptions, load_model  # noqa: E402
from xlstm_tune.bench import harness  # noqa: E402
from xlstm_tune.bench.harness import (  # noqa: E402
    BenchSettings,
    PathMismatchError,
    bench_decode,
    bench_prefill,
    candidate_outputs,
    check_prompt,
    geomean,
    load_reference,
    reference_outputs,
    run_benchmark,
    save_reference,
    verify_stats,
    write_decode_csv,
)
from xlstm_tune.bench.workload import (  # noqa: E402
    PromptSource,
    describe_model,
    device_capabilities,
    parse_lengths,
    prompt_ids,
)
from xlstm_tune.errors import UserError  # noqa: E402
from xlstm_tune.quality.fidelity import fidelity_metrics  # noqa: E402

# busy_retries=0: one measurement per figure whatever the load (the sync count below depends on it)
FAST = BenchSettings(warmup=1, repeats=2, max_cv=10.0, max_rounds=1, busy_retries=0)
INFO = describe_model("tiny")


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny", device="cpu", runtime=RuntimeOptions(compile=False))
    yield m
    m.close()


# ---- workload ---------------------------------------------------------------------------------------
def test_parse_lengths() -> None:
    assert parse_lengths("2048,512, 512") == [512, 2048]
    assert parse_lengths([8192]) == [8192] and parse_lengths(None) == []
    for bad in ("", "0", "12x", "-4", [1.5]):
        with pytest.raises(UserError):
            parse_lengths(bad)


def test_prompt_sources(tmp_path: Path, model) -> None:
    with pytest.raises(UserError, match="both given"):
        PromptSource.from_args("a", "b")
    with pytest.raises(UserError, match="does not exist"):
        PromptSource.from_args(None, tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        PromptSource.from_args(None, empty)
    text = tmp_path / "p.txt"
    text.write_text("hello")
    src = PromptSource.from_args(None, text)
    ids = prompt_ids(model, 12, src)
    assert ids.shape == (1, 12) and ids[0, :5].tolist() == list(b"hello") and ids[0, 5:10].tolist() == list(b"hello")
    assert prompt_ids(model, None, src).shape == (1, 5)
    a, b = prompt_ids(model, 64, PromptSource(seed=3)), prompt_ids(model, 64, PromptSource(seed=3))
    assert torch.equal(a, b) and not torch.equal(a, prompt_ids(model, 64, PromptSource(seed=4)))
    assert int(a.max()) < model.config.vocab_size


def test_cheap_facts() -> None:
    assert INFO["num_heads"] == 4 and INFO["has_slstm"] and INFO["has_mlstm"]
    caps = device_capabilities("cpu")
    assert caps["device_type"] == "cpu" and "eager" in caps["decode_modes"] and caps["streams"] is False
    with pytest.raises(UserError):
        describe_model("no-such-model")


# ---- prefill / decode -------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    RuntimeOptions(backend="native", chunk_size=16, t_inner=4, compile=False),
    RuntimeOptions(backend="queued", chunk_size=16, t_inner=8, heads_per_band=3, workers=2, compile=False),
])
def test_prefill_measures_the_requested_path(model, options: RuntimeOptions) -> None:
    model.runtime = options
    ids = prompt_ids(model, 40, PromptSource())
    res = bench_prefill(model, ids, FAST, model_info=INFO)
    assert res.tok_s.median > 0 and res.tok_s.p20 <= res.tok_s.median <= res.tok_s.p80
    assert res.first_call_s > 0 and res.compile_s >= 0 and res.tokens == 40
    paths = set(res.stats["kernel_paths"])
    want = "mlstm.chunkwise.eager" if options.backend == "native" else "mlstm.step_block.eager"
    assert paths == {want, "slstm.step_block.eager"}
    assert res.stats["chunk_lengths"] == [8, 16]  # 40 tokens: two full chunks and a tail of 8
    if options.backend == "queued":
        assert res.stats["band_widths"] == [1, 3]  # ragged last band
        assert res.stats["step_block_lengths"] == [8]
        assert res.stats["tasks_dispatched"] == res.stats["chunks_run"] > 0
    flat = res.flat()
    assert flat["prefill_tok_s_ctx40"] == res.tok_s.median and "prefill_tok_s_ctx40_p80" in flat
    assert res.flags == []


def test_short_prompt_flagged_and_wrong_path_refused(model) -> None:
    opts = RuntimeOptions(backend="native", chunk_size=64, t_inner=4, compile=False)
    assert check_prompt(10, opts) and "chunk_size=64" in check_prompt(10, opts)[0]
    assert check_prompt(64, opts) == []
    model.runtime = opts
    res = bench_prefill(model, prompt_ids(model, 10, PromptSource()), FAST, model_info=INFO)
    assert res.flags and res.flags[0].startswith("short_prompt")
    with pytest.raises(PathMismatchError, match="should run"):
        verify_stats(opts, {"kernel_paths": {"mlstm.step_block.eager": 3, "slstm.step_block.eager": 1}},
                     has_mlstm=True, has_slstm=True)
    with pytest.raises(PathMismatchError, match="compile"):
        verify_stats(RuntimeOptions(backend="native"), {"kernel_paths": {"mlstm.chunkwise.eager": 1}})
    with pytest.raises(PathMismatchError, match="chunk_size"):
        verify_stats(opts, {"kernel_paths": {"mlstm.chunkwise.eager": 1, "slstm.step_block.eager": 1},
                            "chunk_lengths": [16, 32]}, has_slstm=True)  # no full chunk of 64 among them


def test_decode_and_stats_csv(model, tmp_path: Path) -> None:
    model.runtime = RuntimeOptions(backend="native", chunk_size=16, t_inner=4, compile=False)
    res = bench_decode(model, prompt_ids(model, 20, PromptSource()), 8, FAST)
    assert res.tok_s.median > 0 and res.new_tokens == 8 and res.context_len == 20
    assert res.path == model.runtime.decode_mode == "eager" and res.flat()["decode_path"] == "eager"
    assert len(res.tokens) == 9 and len(res.steps) == 7  # first token from prefill; steps 1..7 timed
    assert [r["step"] for r in res.steps] == list(range(1, 8))
    assert res.steps[-1]["cum_ms"] >= res.steps[0]["dt_ms"]
    path = write_decode_csv(tmp_path / "d.csv", res.steps)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "dt_ms", "cum_ms", "inst_tok_s", "avg_tok_s"] and len(rows) == 8
    with pytest.raises(UserError):
        bench_decode(model, prompt_ids(model, 4, PromptSource()), 0, FAST)


def test_sync_before_every_clock_read(model, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(harness, "_sync", lambda m: (lambda: calls.append("sync")))
    model.runtime = RuntimeOptions(backend="native", chunk_size=16, compile=False)
    bench_prefill(model, prompt_ids(model, 16, PromptSource()), FAST, model_info=INFO)
    # first call: 2 syncs; warm-up: 1; each timed call: 2
    assert calls.count("sync") == 2 + FAST.warmup + 2 * FAST.repeats


def test_run_benchmark_flat_columns(model) -> None:
    model.runtime = RuntimeOptions(backend="native", chunk_size=16, compile=False)
    rep = run_benchmark(model, [16, 32], PromptSource(), 4, FAST, model_info=INFO)
    flat = rep.flat()
    for key in ("prefill_tok_s_ctx16", "prefill_tok_s_ctx32", "prefill_tok_s", "decode_tok_s", "decode_tok_s_cv",
                "prefill_s", "decode_s", "compile_s", "prefill_first_call_s_ctx32"):
        assert key in flat, key
    # the headline prefill figure is the geometric mean over the context lengths (computed here by hand)
    assert flat["prefill_tok_s"] == pytest.approx(math.sqrt(flat["prefill_tok_s_ctx16"] * flat["prefill_tok_s_ctx32"]))
    assert flat["prefill_tok_s_ctx16"] != flat["prefill_tok_s_ctx32"]  # two measurements, not one copied
    assert rep.as_dict()["decode"]["new_tokens"] == 4
    assert math.isnan(geomean([]))  # nothing measured: NaN, never 0 or 1


# ---- fidelity inputs and the reference cache ----------------------------------------------------------
def test_reference_and_candidate_logits(model, tmp_path: Path) -> None:
    ids = prompt_ids(model, 24, PromptSource())
    ref, tokens = reference_outputs(model, ids, 3)
    assert ref.shape == (1, 27, model.config.vocab_size) and len(tokens) == 3
    model.runtime = RuntimeOptions(backend="queued", chunk_size=8, t_inner=2, heads_per_band=2, workers=2, compile=False)
    out = candidate_outputs(model, ids, tokens)
    m = fidelity_metrics(out, ref)
    assert m["rel_err"] < 1e-5 and m["greedy_agreement"] == 1.0
    meta = {"model": "tiny", "n": 24}
    save_reference(tmp_path / "r" / "ref.pt", ref, tokens, meta)
    loaded = load_reference(tmp_path / "r" / "ref.pt", meta)
    assert loaded is not None and torch.equal(loaded[0], ref) and loaded[1] == tokens
    assert load_reference(tmp_path / "r" / "ref.pt", {"model": "tiny", "n": 25}) is None  # other inputs
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    assert load_reference(tmp_path / "junk.pt", meta) is None


def test_settings_validation() -> None:
    for bad in ({"repeats": 0}, {"warmup": -1}, {"max_cv": 0}, {"max_rounds": 0}):
        with pytest.raises(UserError):
            BenchSettings(**bad)
