"""benchmarks/profile_prefill.py across fresh processes: each measures the same prefill, and the table of
kernels that move between them is built from what each process's profiler saw."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny", "--device", "cpu", "--dtype", "float32", "--length", "48", "--no-compile", "--repeats", "2",
        "--top", "3"]
ROW = re.compile(r"^\| (\d) \| (this|base) \| ([\d,]+) \| [\d.]+% \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| \d+% \| (\d+) \|$", re.M)


def _rows(out: str) -> list[tuple[str, ...]]:
    return ROW.findall(out)


def test_two_processes_measure_the_same_prefill_and_list_the_kernels_that_move(capsys) -> None:
    assert load_benchmark("profile_prefill").main(ARGS + ["--processes", "2"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [(r[0], r[1]) for r in rows] == [("1", "this"), ("2", "this")]
    for _, _, tok_s, profiled_ms, busy_ms, calls in rows:
        assert float(tok_s.replace(",", "")) > 0 and 0 < float(busy_ms) <= float(profiled_ms) * 1.5
    assert rows[0][5] == rows[1][5] and int(rows[0][5]) > 0  # the same ops ran in both processes
    moving = out.split("kernels whose time moves most between the 2 processes")[1]
    kernel_rows = [line for line in moving.splitlines() if line.startswith("| aten::")]
    assert len(kernel_rows) == 3
    for line in kernel_rows:
        p1, p2, spread = (float(x) for x in line.strip("| ").split(" | ")[1:])
        assert abs(abs(p1 - p2) - spread) < 0.011  # max - min of the two processes' times, as printed


def test_a_base_tree_alternates_with_this_one_and_gets_its_median_and_ratio(tmp_path, capsys) -> None:
    base = tmp_path / "base"
    shutil.copytree(REPO / "xlstm_tune", base / "xlstm_tune", ignore=shutil.ignore_patterns("__pycache__"))
    assert load_benchmark("profile_prefill").main(ARGS + ["--base", str(base)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [(r[0], r[1]) for r in rows] == [("1", "this"), ("2", "base")]
    assert rows[0][5] == rows[1][5]  # identical trees: the same ops
    packages = re.search(r"^packages: this (.+); base (.+)$", out, re.M)  # where each worker imported from
    assert packages and packages.groups() == (str(REPO / "xlstm_tune"), str((base / "xlstm_tune").resolve()))
    medians = dict(re.findall(r"(this|base): median ([\d,]+) tok/s", out))
    ratio = float(re.search(r"this / base ([\d.]+)x", out).group(1))
    this, other = (float(medians[t].replace(",", "")) for t in ("this", "base"))
    assert abs(ratio - this / other) < 0.002 * ratio + 0.001


def test_bad_input_is_a_one_line_error(tmp_path, capsys) -> None:
    import torch

    mod = load_benchmark("profile_prefill")
    assert mod.main(["--model", "tiny", "--device", "cpu", "--processes", "0"]) == 2
    assert mod.main(["--model", "tiny", "--device", "cpu", "--base", str(tmp_path)]) == 2
    if not torch.cuda.is_available():
        assert mod.main(["--model", "tiny", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == (2 if torch.cuda.is_available() else 3) and all(line.startswith("profile_prefill.py:") for line in err)
