"""prefill_segment: prompts fed in pieces of a bounded set of lengths give the whole prompt's answers, and the
pieces that ran are counted where they ran (runtime.prefill_segments, LanguageModel._prefill)."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest
import torch

from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.bench.harness import BenchSettings, PathMismatchError, bench_prefill, verify_stats
from xlstm_tune.bench.workload import describe_model
from xlstm_tune.errors import UserError
from xlstm_tune.runtime.prefill_segments import SEGMENT_ENV, current_segment, piece_lengths, shape_bound
from xlstm_tune.runtime.settings import RuntimeSettings, resolve_runtime, settings_from_mapping


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_pieces_cover_the_prompt_with_few_lengths() -> None:
    segment = 2 ** random.randint(3, 9)
    seen: set[int] = set()
    shapes: set[tuple[int, bool]] = set()  # what a graph is kept per: length, and whether a state comes in
    for total in random.sample(range(1, 5 * segment), min(60, 5 * segment - 1)):
        pieces = piece_lengths(total, segment)
        shapes.update((n, i > 0) for i, n in enumerate(pieces))
        assert sum(pieces) == total and max(pieces) <= segment
        full = total // segment
        assert pieces[:full] == [segment] * full
        tail = pieces[full:]
        assert tail == sorted(set(tail), reverse=True) and all(n & (n - 1) == 0 for n in tail)  # distinct powers of two
        seen.update(pieces)
    assert len(seen) <= 1 + int(math.log2(segment))  # whatever the prompts: the shapes a process compiles
    assert len(shapes) <= shape_bound(segment) == 2 * (1 + int(math.log2(segment))) and shape_bound(0) == 0
    assert piece_lengths(1000, 256) == [256, 256, 256, 128, 64, 32, 8]
    assert piece_lengths(777, 0) == [777] and piece_lengths(96, 100) == [64, 32]


def test_the_setting_in_every_source_and_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RuntimeSettings().prefill_segment == 0
    assert RuntimeSettings(prefill_segment=2048).to_env()[SEGMENT_ENV] == "2048"
    assert resolve_runtime(environ={SEGMENT_ENV: "512"})[1].prefill_segment == 512
    assert settings_from_mapping({"prefill_segment": 64}, "[runtime]").prefill_segment == 64
    for bad in (-1, 65537, "many"):
        with pytest.raises(UserError) as exc:
            RuntimeSettings(prefill_segment=bad)
        assert "prefill_segment" in str(exc.value) and "\n" not in str(exc.value)
    monkeypatch.setenv(SEGMENT_ENV, "64")
    assert current_segment() == 64
    monkeypatch.setenv(SEGMENT_ENV, "-3")
    with pytest.raises(UserError, match=SEGMENT_ENV):
        current_segment()


@pytest.mark.parametrize("options", [
    RuntimeOptions(backend="native", chunk_size=16, compile=False),
    RuntimeOptions(backend="queued", chunk_size=16, heads_per_band=2, workers=2, t_inner=4, compile=False),
], ids=["native", "queued"])
def test_a_prompt_in_pieces_answers_as_the_whole_prompt(options: RuntimeOptions, seed: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("tiny", device="cpu", runtime=options)
    try:
        gen = torch.Generator().manual_seed(seed)
        length = int(torch.randint(70, 200, (1,), generator=gen))
        ids = torch.randint(0, model.config.vocab_size, (2, length), generator=gen)
        nxt = torch.randint(0, model.config.vocab_size, (2, 1), generator=gen)
        monkeypatch.delenv(SEGMENT_ENV, raising=False)
        whole, whole_state = model(ids)
        after_whole, _ = model(nxt, whole_state)
        ref, _ = model.reference_forward(ids)
        segment = random.choice([16, 32, 64])
        monkeypatch.setenv(SEGMENT_ENV, str(segment))
        model.stats.reset()
        cut, cut_state = model(ids)
        ran = model.stats.as_dict()
        after_cut, _ = model(nxt, cut_state)  # the state each piece left carries on into decode
        assert cut.shape == whole.shape
        assert _rel(cut, whole) < 1e-4 and _rel(cut, ref) < 1e-4
        assert _rel(after_cut, after_whole) < 1e-4
        pieces = piece_lengths(length, segment)
        assert len(pieces) > 1 and ran["prefill_lengths"] == sorted(set(pieces))
        assert ran["prefill_paths"] == {"call": len(pieces)}
        assert ran["tokens_prefilled"] == whole_tokens(model, length, ids.shape[0])
        verify_stats(model.runtime, ran, has_slstm=bool(model.config.slstm_block_indices))
    finally:
        model.close()


def whole_tokens(model, length: int, batch: int) -> int:
    """What the mLSTM cells are counted for over one prompt, whole: the same when it runs in pieces."""
    model.stats.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(SEGMENT_ENV, raising=False)
        model(torch.zeros(batch, length, dtype=torch.long))
    return model.stats.as_dict()["tokens_prefilled"]


def test_the_harness_checks_the_chunks_of_each_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", chunk_size=16, compile=False))
    try:
        monkeypatch.setenv(SEGMENT_ENV, "64")
        ids = torch.randint(0, model.config.vocab_size, (1, 64 + 32 + 8 + 2))
        info = describe_model("tiny")
        result = bench_prefill(model, ids, BenchSettings(warmup=0, repeats=1, max_rounds=1), model_info=info)
        assert result.stats["prefill_lengths"] == [2, 8, 32, 64] and result.stats["chunk_lengths"] == [2, 8, 16]
        has_slstm = info["has_slstm"]
        verify_stats(model.runtime, result.stats, has_slstm=has_slstm)
        with pytest.raises(PathMismatchError, match="chunk_size=32"):
            verify_stats(model.runtime.replace(chunk_size=32), result.stats, has_slstm=has_slstm)
    finally:
        model.close()


def test_bench_takes_the_flag_and_refuses_a_bad_one_in_one_line(tmp_path) -> None:
    def bench(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xlstm_tune", "bench", "--model", "tiny", "--device", "cpu",
                               "--prefill-len", "100", "--new-tokens", "2", "--repeats", "1", "--json", *flags],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)

    bad = bench("--prefill-segment", "-5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "prefill_segment=-5" in bad.stderr
    ok = bench("--prefill-segment", "32")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert '"prefill_segment": 32' in ok.stdout and '"prefill_lengths": [\n' in ok.stdout


def test_the_benchmark_compares_both_modes_in_fresh_processes(capsys) -> None:
    from benchmark_scripts import load_benchmark

    script = load_benchmark("prefill_segments")
    assert script.main(["--lengths", "0,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefill_segments.py: --lengths must be positive") and "\n" not in err
    assert script.main(["--lengths", "40,72", "--segment", "32", "--chunk-size", "16", "--repeats", "1",
                        "--no-compile"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    body = {r[0].strip(): r for r in rows[1:]}  # after the header
    assert body["40"][3].strip() == "[8, 32]" and body["72"][3].strip() == "[8, 32]"  # 32 + 8; 32 + 32 + 8
    assert all(float(body[n][7]) < 1e-4 for n in ("40", "72"))  # the same answer, fed in pieces
    assert body["all 2"][3].strip() == "2 lengths"
    # what ran, counted per length over its first call and one warm call: whole, 2 launched prefills;
    # in pieces, one per piece (40 = 32 + 8, 72 = 32 + 32 + 8)
    assert body["40"][8].strip() == "call 2; call 4" and body["72"][8].strip() == "call 2; call 6"


def test_a_spec_carries_the_setting_and_studies_from_before_it_still_resume() -> None:
    from xlstm_tune.study.spec import parse_spec

    space = {"space": {"chunk_size": [16, 32]}}
    assert parse_spec(space, "x.toml").runtime["prefill_segment"] == 0
    assert "prefill_segment" not in parse_spec(space, "x.toml").measurement_identity()["runtime"]
    cut = parse_spec({**space, "runtime": {"prefill_segment": 256}}, "x.toml")
    assert cut.runtime["prefill_segment"] == 256 and cut.measurement_identity()["runtime"]["prefill_segment"] == 256
    with pytest.raises(UserError, match="prefill_segment"):
        parse_spec({**space, "runtime": {"prefill_segment": 1 << 20}}, "x.toml")
