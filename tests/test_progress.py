"""The study's progress display: the phase inside a trial and the estimate of the time left.

The phases come from a real trial worker measuring the tiny model; the display logic runs on an injected
clock, so what is printed when is decided by the test, not by the machine's speed.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from xlstm_tune.study.evaluator import WorkerEvaluator
from xlstm_tune.study.progress import Progress, duration_text
from xlstm_tune.study.worker import WorkerFailure

KNOBS = dict(backend="native", chunk_size=16, heads_per_band=4, workers=1, t_inner=4, streams=0, decode_mode="eager")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """A listener that keeps every phase message and counts the ticks."""

    def __init__(self) -> None:
        self.phases: list[dict[str, Any]] = []
        self.ticks = 0

    def phase(self, msg: dict[str, Any]) -> None:
        self.phases.append(dict(msg))

    def tick(self) -> None:
        self.ticks += 1


def _setup(tmp_path: Path, repeats: int, rounds: int) -> dict[str, Any]:
    return {
        "model": "tiny", "device": "cpu", "dtype": "float32", "compile": False,
        # max_cv below any real noise: every figure takes all its rounds, so the call count is known
        "bench": {"warmup": 1, "repeats": repeats, "max_cv": 1e-12, "max_rounds": rounds, "busy_retries": 0},
        "context_lens": [16, 32], "new_tokens": 3, "decode_context_len": 16,
        "fidelity": {"rel_tol": 1e-4, "min_greedy_agreement": None, "prompt_len": 16, "decode_steps": 2},
        "reference_path": str(tmp_path / "reference.pt"), "outputs_dir": str(tmp_path / "outputs"),
        "quality": {"perplexity": False},
    }


@pytest.fixture()
def evaluator(tmp_path: Path):
    ev = WorkerEvaluator(_setup(tmp_path, repeats=2, rounds=2), tmp_path / "workers", trial_timeout_s=120,
                         start_timeout_s=300)
    yield ev
    ev.close()


def test_a_real_trial_announces_every_phase_and_every_call_it_makes(evaluator: WorkerEvaluator) -> None:
    heard = Recorder()
    evaluator.listener = heard
    evaluator.start()
    start = [m for m in heard.phases if m["number"] is None]
    assert [m["stage"] for m in start] == ["loading the model", "reference outputs"]  # no cached reference yet
    assert start[0]["detail"] == "tiny on cpu, float32"
    heard.phases.clear()

    reply = evaluator.evaluate(7, KNOBS)
    assert reply["state"] == "COMPLETE"
    assert {m["number"] for m in heard.phases} == {7}
    stages = [m["stage"] for m in heard.phases]
    order = list(dict.fromkeys(stages))  # stages in the order they began
    assert order == ["screen at 16 tokens", "prefill 16", "prefill 32", "decode 3 tokens", "fidelity", "quality"]
    assert heard.ticks > 0  # the parent polled while the worker measured
    metrics = reply["metrics"]

    def timed(stage: str) -> int:
        return sum(1 for m in heard.phases if m["stage"] == stage and m["detail"].startswith("timed call"))

    # Each timed call announced is one sample of the figure, so the display follows what really ran.
    assert timed("prefill 16") == metrics["prefill_tok_s_ctx16_n"] == 4
    assert timed("prefill 32") == metrics["prefill_tok_s_ctx32_n"] == 4
    assert timed("decode 3 tokens") == metrics["decode_tok_s_n"] == 4
    screen = [m["detail"] for m in heard.phases if m["stage"] == "screen at 16 tokens"]
    assert screen[:2] == ["first call", "timed call 1/1"]  # one repeat (more only on a busy machine)
    assert all(d.endswith("(re-measuring)") for d in screen[2:])
    for stage in ("prefill 16", "prefill 32", "decode 3 tokens"):
        details = [m["detail"] for m in heard.phases if m["stage"] == stage]
        first = [d for d in details if d.startswith(("first call", "warm-up", "timed call"))]
        assert first[:2] == ["first call", "warm-up 1/1"]  # compile is off: nothing compiles
        assert first[2:4] == ["timed call 1/2", "timed call 2/2"]
        assert first[4:] == ["timed call 3 (re-measuring)", "timed call 4 (re-measuring)"]


def test_a_trial_killed_by_its_time_limit_says_which_phase_it_was_in(evaluator: WorkerEvaluator) -> None:
    evaluator.trial_timeout_s = 5
    evaluator.start()
    with pytest.raises(WorkerFailure) as failure:
        evaluator.evaluate(3, KNOBS, "timeout")
    assert failure.value.reason == "timeout"
    assert "(during fault injection: timeout)" in failure.value.message


def test_a_log_gets_a_line_for_a_phase_that_lasts_and_none_for_a_quick_one() -> None:
    clock, err = Clock(), io.StringIO()
    progress = Progress(False, 4, 0, "s", err, clock=clock, quiet_s=5, repeat_s=30)
    progress.running(2, KNOBS)
    progress.phase({"number": 2, "stage": "prefill 512", "detail": "first call (compiles)"})
    clock.t += 4
    progress.tick()
    assert err.getvalue() == ""  # 4 s: not yet worth a line
    progress.phase({"number": 2, "stage": "prefill 2048", "detail": "first call (compiles)"})
    clock.t += 4
    progress.tick()
    assert err.getvalue() == ""  # the new stage began 4 s ago
    clock.t += 2
    progress.tick()
    assert err.getvalue() == "[trial 2] prefill 2048: first call (compiles) (10 s in)\n"
    progress.phase({"number": 2, "stage": "prefill 2048", "detail": "timed call 1/3"})
    clock.t += 10
    progress.tick()
    assert err.getvalue().count("\n") == 1  # the same stage is not announced twice
    clock.t += 25
    progress.tick()
    assert err.getvalue().splitlines()[-1] == "[trial 2] still prefill 2048: timed call 1/3 (45 s in)"


def test_the_estimate_follows_the_pace_of_complete_trials_and_the_time_limit() -> None:
    clock, err = Clock(), io.StringIO()
    progress = Progress(False, 10, 0, "s", err, clock=clock, timeout_s=600)
    assert progress.eta_text() == "trials: ~10 min left (time limit)"
    clock.t += 60
    progress.done({"number": 0, "state": "COMPLETE", "prefill_tok_s": 1.0, "decode_tok_s": 1.0, "feasible": True,
                   "duration_s": 60.0}, 2, "best")
    # 2 complete in 60 s -> 8 more take 240 s, within the 540 s the limit leaves
    assert progress.eta_text() == "trials: ~4 min left (at this run's pace)"
    assert err.getvalue().startswith("[trial 0] COMPLETE in 60 s: prefill 1 tok/s")
    assert err.getvalue().rstrip().endswith("| trials: ~4 min left (at this run's pace)")
    clock.t += 400
    progress.done({"number": 1, "state": "PRUNED", "failure_reason": "hopeless", "prune_reason": "slow",
                   "duration_s": 2.0}, 3, "best")
    # 3 complete in 460 s would need ~1,073 s more; the limit leaves 140 s
    assert progress.eta_text() == "trials: ~2 min left (time limit)"
    resumed = Progress(False, 10, 10, "s", io.StringIO(), clock=clock)
    assert resumed.eta_text() == ""  # nothing left to run


def test_a_terminal_bar_shows_the_phase_in_its_description() -> None:
    clock = Clock()
    progress = Progress(True, 3, 0, "s", io.StringIO(), clock=clock)
    try:
        progress.running(1, KNOBS)
        progress.phase({"number": 1, "stage": "decode 32 tokens", "detail": "timed call 2/3"})
        assert progress.bar.desc == "trial 1 native/c16: decode 32 tokens, timed call 2/3"
        progress.section("confirmation")
        progress.phase({"number": None, "stage": "confirmation round 1/3", "detail": "the default"})
        assert progress.bar.desc == "confirmation: confirmation round 1/3, the default"
    finally:
        progress.close()


@pytest.mark.parametrize("seconds, text", [(3.25, "3.2 s"), (45, "45 s"), (600, "10 min"), (3 * 3600 + 300, "3 h 05 min")])
def test_durations_read_at_the_precision_an_estimate_deserves(seconds: float, text: str) -> None:
    assert duration_text(seconds) == text
