"""benchmarks/profile_prefill.py across fresh processes: each measures the same prefill, and the table of
kernels that move between them is built from what each process's profiler saw."""
from __future__ import annotations

import re

from benchmark_scripts import load_benchmark


def _script():
    return load_benchmark("profile_prefill")


def test_two_processes_measure_the_same_prefill_and_list_the_kernels_that_move(capsys) -> None:
    mod = _script()
    args = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--length", "48", "--no-compile",
            "--repeats", "2", "--processes", "2", "--top", "3"]
    assert mod.main(args) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\d) \| ([\d,]+) \| [\d.]+% \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| \d+% \| (\d+) \|$", out, re.M)
    assert [r[0] for r in rows] == ["1", "2"]
    for _, tok_s, profiled_ms, busy_ms, calls in rows:
        assert float(tok_s.replace(",", "")) > 0 and 0 < float(busy_ms) <= float(profiled_ms) * 1.5
    assert rows[0][4] == rows[1][4] and int(rows[0][4]) > 0  # the same ops ran in both processes
    moving = out.split("kernels whose time moves most between the 2 processes")[1]
    kernel_rows = [line for line in moving.splitlines() if line.startswith("| aten::")]
    assert len(kernel_rows) == 3
    for line in kernel_rows:
        p1, p2, spread = (float(x) for x in line.strip("| ").split(" | ")[1:])
        assert abs(abs(p1 - p2) - spread) < 0.011  # max - min of the two processes' times, as printed


def test_bad_counts_and_a_missing_gpu_are_one_line_errors(capsys) -> None:
    mod = _script()
    assert mod.main(["--model", "tiny", "--device", "cpu", "--processes", "0"]) == 2
    assert mod.main(["--model", "tiny", "--device", "cuda:0"] if not __import__("torch").cuda.is_available()
                    else ["--model", "tiny", "--device", "cpu", "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("profile_prefill.py:" in line for line in err)
