"""bench.load: a CPU-burning process started for the test shows up as other processes' CPU time, the
figure is re-measured (bounded) and flagged busy_machine; our own work is never counted as load."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest

from xlstm_tune.bench.harness import BUSY_FLAG, BenchSettings, bench_prefill, run_benchmark
from xlstm_tune.bench.load import LoadProbe, is_busy, measure_unloaded
from xlstm_tune.bench.workload import PromptSource, describe_model, prompt_ids

BURN = "while True: pass"


def _cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


@pytest.fixture
def burner() -> Iterator[int]:
    """A busy loop outside this process's tree (started by a launcher that exits at once), on our CPUs.

    Outside the tree, because the probe subtracts our own tree's CPU time: a child would count as ours.
    """
    launcher = ("import subprocess, sys; "
                f"p = subprocess.Popen([sys.executable, '-c', {BURN!r}], start_new_session=True, "
                "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    try:
        psutil.Process(pid).cpu_affinity(psutil.Process().cpu_affinity())
        assert pid not in {c.pid for c in psutil.Process().children(recursive=True)}
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _spin_until_burned(pid: int, seconds: float) -> float:
    """Busy-wait (our own CPU, which the probe subtracts) until the burner has used `seconds` of CPU."""
    start = _cpu_s(pid)
    while _cpu_s(pid) - start < seconds:
        pass
    return _cpu_s(pid) - start


def test_other_process_cpu_is_measured(burner: int) -> None:
    with LoadProbe() as probe:
        burned = _spin_until_burned(burner, 0.3)
    s = probe.sample
    assert s is not None
    # the burner's CPU time is counted as others' (10 ms tick granularity per CPU), ours is not
    assert s.other_cpu_s >= burned * 0.9 - 0.02 * s.cpus, (s, burned)
    assert s.own_cpu_s > 0 and s.other_cpu_frac > 0
    assert s.other_cpu_frac == pytest.approx(s.other_cpu_s / (s.wall_s * s.cpus))
    assert s.loadavg_1m is None or s.loadavg_1m >= 0
    assert s.accelerator == {}  # no device asked for, nothing read


def test_busy_is_re_measured_then_flagged(burner: int) -> None:
    calls = []

    def run() -> str:
        calls.append(1)
        _spin_until_burned(burner, 0.1)
        return "figure"

    # Whatever the contention, the burner alone takes >= 0.1 s per attempt: far above 0.1% of our CPUs
    # unless an attempt lasts for minutes.
    result, sample, attempts = measure_unloaded(run, max_other_cpu=0.001, retries=2, persistent_load_per_cpu=None)
    assert result == "figure" and sample.busy and attempts == 3 and len(calls) == 3  # bounded: 1 + retries
    result, sample, attempts = measure_unloaded(run, max_other_cpu=1e9, retries=2)
    assert not sample.busy and attempts == 1 and len(calls) == 4
    # an overload the load average says will outlast a retry: flagged at once
    result, sample, attempts = measure_unloaded(run, max_other_cpu=0.001, retries=2, persistent_load_per_cpu=0.0)
    assert sample.busy and attempts == 1 and len(calls) == 5


def test_harness_flags_a_figure_taken_under_load(burner: int) -> None:
    import torch

    from xlstm_tune import load_model
    from xlstm_tune.runtime.options import RuntimeOptions

    # One intra-op thread leaves the burner a CPU of its own on a 2-core machine: with two, our spinning
    # threads and the burner fight over both CPUs and the burner's share varies from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", chunk_size=16, compile=False))
    # ~40 calls of ~20 ms: each figure lasts far longer than the CPU counters' error (a tick per CPU and
    # one for us: 30 ms on 2 CPUs), which `busy` discounts.
    busy = BenchSettings(warmup=0, repeats=40, max_cv=10.0, max_rounds=1, busy_retries=1, max_other_cpu=0.001)
    try:
        ids = prompt_ids(model, 256, PromptSource())
        info = describe_model("tiny")
        for measured in ("bench_prefill", "run_benchmark"):
            before = _cpu_s(burner)
            if measured == "bench_prefill":
                res = bench_prefill(model, ids, busy, model_info=info)
            else:
                report = run_benchmark(model, [256], PromptSource(), 2, busy, model_info=info)
                res = report.prefill[0]
            if _cpu_s(burner) - before < 0.1:
                pytest.fail(f"the burner got no CPU during {measured}; the machine is saturated beyond use")
            assert res.busy and res.load["busy"] and res.load["other_cpu_s"] > 0, (measured, res.load)
        flat = res.flat()
        assert flat["prefill_busy_ctx256"] is True and flat["prefill_other_cpu_frac_ctx256"] > 0.001
        assert f"ctx256: {BUSY_FLAG}" in report.flags and report.flat()[BUSY_FLAG] is True
        assert report.as_dict()["prefill"][0]["load"]["busy"] is True
    finally:
        model.close()
        torch.set_num_threads(threads)


def test_study_summary_warns_about_busy_trials() -> None:
    from xlstm_tune.study.runner import busy_note

    records = [{"number": 0, "busy_machine": False}, {"number": 3, "busy_machine": True},
               {"number": 1, "busy_machine": True}, {"number": 2}]
    note = busy_note(records, 0.25)
    assert note is not None and note.startswith("warning: 2 trial(s)") and "[1, 3]" in note and "25%" in note
    assert busy_note(records[:1] + records[3:], 0.25) is None


def test_busy_discounts_the_cpu_counters_error() -> None:
    """A tick per CPU and one for our process: a one-call screen on an idle 2-core machine that reads one
    stray tick of others' time is not busy; the same share over a long measurement is."""
    tick = 0.01
    assert not is_busy(0.02, 0.04, 2, 0.25, tick)   # 25% of 80 ms, inside the 30 ms error
    assert is_busy(0.06, 0.04, 2, 0.25, tick)       # 60 ms of 80 ms: beyond it
    assert is_busy(0.6, 1.0, 2, 0.25, tick)         # 30% of two CPUs for a second
    assert not is_busy(0.4, 1.0, 2, 0.25, tick)     # 20%
    assert not is_busy(2.0 + 3 * tick, 1.0, 2, 1.0, tick)  # max_other_cpu = 1.0: never, rounding included
