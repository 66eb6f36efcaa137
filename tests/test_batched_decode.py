"""Batched decode above the kernels: B sequences at once give each sequence's own greedy tokens, and the
benchmark counts B x steps tokens and says which batch it measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import child_env, rel_err
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.bench.harness import decode_step_rows
from xlstm_tune.bench.workload import PromptSource, prompt_ids
from xlstm_tune.errors import UserError
from xlstm_tune.study.spec import parse_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", compile=False, decode_mode="eager"))
    yield m
    m.close()


def test_batched_prompts_keep_row_0_and_differ_between_rows(model, tmp_path: Path) -> None:
    for source in (PromptSource(seed=5), PromptSource(text="one two three four five", origin="--prompt")):
        one, three = prompt_ids(model, 12, source), prompt_ids(model, 12, source, batch=3)
        assert three.shape == (3, 12) and torch.equal(three[:1], one)
        assert not torch.equal(three[0], three[1]) and not torch.equal(three[1], three[2])
    with pytest.raises(UserError, match="batch_size"):
        prompt_ids(model, 12, PromptSource(), batch=0)


def test_batched_greedy_generate_equals_each_sequence_alone(model, seed) -> None:
    prompts = prompt_ids(model, 14, PromptSource(seed=seed % 1000), batch=2)
    assert not torch.equal(prompts[0], prompts[1])
    together, state = model.generate(prompts, max_new_tokens=10)
    assert together.shape == (2, 10)
    for row in range(2):
        alone, alone_state = model.generate(prompts[row:row + 1], max_new_tokens=10)
        assert torch.equal(together[row:row + 1], alone), f"row {row} seed={seed}"
        for block, block_alone in zip(state, alone_state):
            for t, u in zip(block, block_alone):
                # float32 sums of another batch shape: equal up to rounding
                assert torch.equal(t[row:row + 1], u) or rel_err(t[row:row + 1], u) < 1e-5, f"row {row} seed={seed}"


def test_step_rows_count_every_sequence_of_a_step() -> None:
    rows = decode_step_rows([(1, 0.5), (2, 0.25)], batch_size=4)
    assert [r["inst_tok_s"] for r in rows] == [8.0, 16.0]
    assert rows[-1]["avg_tok_s"] == pytest.approx(4 * 2 / 0.75)


def test_spec_batch_size_is_read_and_checked() -> None:
    space = {"space": {"chunk_size": [16, 32]}}
    assert parse_spec(space, "x.toml").workload["batch_size"] == 1
    spec = parse_spec({**space, "workload": {"batch_size": 8}}, "x.toml")
    assert spec.workload["batch_size"] == 8
    assert spec.measurement_identity()["workload"]["batch_size"] == 8
    assert "batch_size" not in parse_spec(space, "x.toml").measurement_identity()["workload"]  # old studies resume
    for bad in (0, "4", True):
        with pytest.raises(UserError, match=r"\[workload\] batch_size"):
            parse_spec({**space, "workload": {"batch_size": bad}}, "x.toml")


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run([sys.executable, "-m", "xlstm_tune", "bench", "--model", "tiny", "--device", "cpu",
                           "--no-compile", "--decode-mode", "eager", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_bench_batch_size_reports_the_batch_and_counts_batch_times_steps() -> None:
    proc = _bench("--prefill-len", "8", "--new-tokens", "5", "--batch-size", "2", "--repeats", "3",
                  "--max-rounds", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    dec = out["decode"]
    assert dec["batch_size"] == 2 and out["metrics"]["decode_batch_size"] == 2 and dec["new_tokens"] == 5
    # 3 timed calls (odd): the median tok/s is the tokens per call over the median seconds
    assert dec["tok_s"]["median"] * dec["seconds"]["median"] == pytest.approx(2 * 5, rel=1e-9)
    assert out["prefill"][0]["context_len"] == 8


def test_bench_batch_size_must_be_positive() -> None:
    proc = _bench("--prefill-len", "8", "--new-tokens", "2", "--batch-size", "0")
    assert proc.returncode == 2 and "--batch-size" in proc.stderr and "Traceback" not in proc.stderr


def test_study_decodes_workload_batch_size_sequences_per_trial(tmp_path: Path) -> None:
    """`[workload] batch_size` reaches the trial worker: the trial's record says it decoded 2 sequences."""
    spec = tmp_path / "bs.toml"
    spec.write_text(
        '[study]\nname = "bs"\nn_trials = 1\nsampler = "grid"\nobjectives = ["decode_tok_s"]\n'
        '[model]\nname = "tiny"\ndevice = "cpu"\ncompile = false\n'
        '[workload]\ncontext_lens = [16]\nnew_tokens = 3\nbatch_size = 2\n'
        '[bench]\nrepeats = 1\nwarmup = 0\nmax_rounds = 1\n[fidelity]\nprompt_len = 16\ndecode_steps = 2\n'
        '[confirm]\nrounds = 1\ntop_k = 1\n[quality]\njudge = "none"\nperplexity = false\n'
        '[space]\nbackend = ["native"]\nchunk_size = [16]\n')
    env = child_env()
    proc = subprocess.run([sys.executable, "-m", "xlstm_tune", "study", "--experiment", str(spec), "--out-dir",
                           str(tmp_path / "out"), "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out" / "studies" / "bs" / "trials.jsonl").read_text().splitlines()]
    trials = [r for r in lines if "decode_batch_size" in r]
    assert trials and all(r["decode_batch_size"] == 2 and r["decode_new_tokens"] == 3 for r in trials)
