"""Plots: what each figure draws (its artists' data against the records or CSV it was given), trial order,
non-overlapping labels, and that every function writes a real PNG, for empty and all-failed input too."""
from __future__ import annotations

import math
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from xlstm_tune.errors import UserError
from xlstm_tune.quality.plots import (
    KNOBS,
    best_by_knob,
    pareto_front,
    plot_all,
    plot_best_by_knob,
    plot_decode_steps,
    plot_history,
    plot_param_importances,
    plot_prefill_vs_decode,
    decode_steps_figure,
    prefill_vs_decode_figure,
)
from xlstm_tune.study.plotting import _stats_csvs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 8_000) -> tuple[int, int]:
    """A real, non-trivial PNG: magic bytes, an IHDR chunk, a sensible size; returns (w, h)."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 300 <= width <= 3000 and 200 <= height <= 3000, (width, height)
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    return width, height


def synthetic_records(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Trials as in trials.jsonl: mostly complete, some infeasible, failed and pruned."""
    recs = []
    for i in range(n):
        knobs = {
            "backend": rng.choice(["queued", "ray", "native"]),
            "chunk_size": rng.choice([16, 32, 64, 128]),
            "heads_per_band": rng.choice([1, 2, 4, 8]),
            "workers": rng.choice([1, 2, 4]),
            "t_inner": rng.choice([1, 2, 4, 8]),
            "streams": rng.choice([0, 1, 2]),
            "decode_mode": rng.choice(["eager", "compiled", "graph"]),
        }
        u = rng.random()
        state, passed = "COMPLETE", True
        if u < 0.15:
            state, passed = "FAIL", None
        elif u < 0.2:
            state, passed = "PRUNED", None
        elif u < 0.3:
            state, passed = "INFEASIBLE", False
        if state in ("FAIL", "PRUNED"):
            prefill = decode = None
        else:
            prefill = rng.uniform(500, 5000) * knobs["chunk_size"] / 64
            decode = rng.uniform(5, 40) * (2.0 if knobs["decode_mode"] == "graph" else 1.0)
        recs.append({"number": i, "state": state, **knobs, "prefill_tok_s": prefill,
                     "decode_tok_s": decode, "fidelity_passed": passed})
    return recs


@pytest.fixture
def rng(seed: int) -> random.Random:
    """Fresh random records each run; the seed (conftest) is printed, pytest shows it on failure."""
    print(f"plot test seed {seed}")
    return random.Random(seed)


def write_stats_csv(path: Path, steps: int, rng: random.Random) -> Path:
    rows, cum = ["step,dt_ms,cum_ms,inst_tok_s,avg_tok_s"], 0.0
    for s in range(steps):
        dt = (900.0 if s == 0 else rng.uniform(20, 30))  # first step: compilation spike
        cum += dt
        rows.append(f"{s},{dt:.3f},{cum:.3f},{1000 / dt:.3f},{1000 * (s + 1) / cum:.3f}")
    path.write_text("\n".join(rows) + "\n")
    return path


# ------------------------------------------------------------------------------ pareto helper


def test_pareto_front_hand_checked() -> None:
    pts = [
        (1.0, 5.0),  # 0 front
        (2.0, 4.0),  # 1 front
        (3.0, 3.0),  # 2 dominated by 7 (same y, larger x)
        (2.0, 2.0),  # 3 dominated by 1
        (0.0, 6.0),  # 4 front
        (1.0, 5.0),  # 5 duplicate of 0: kept
        (math.nan, 9.0),  # 6 ignored
        (4.0, 3.0),  # 7 front
        (4.0, 1.0),  # 8 dominated by 7 (same x, lower y)
    ]
    assert pareto_front(pts) == [4, 0, 5, 1, 7]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]) == [2]


def test_pareto_front_matches_brute_force_on_random_points(rng: random.Random) -> None:
    pts = [(float(rng.randint(0, 15)), float(rng.randint(0, 15))) for _ in range(200)]

    def dominated(i: int) -> bool:
        xi, yi = pts[i]
        return any(x >= xi and y >= yi and (x > xi or y > yi) for x, y in pts)

    assert sorted(pareto_front(pts)) == [i for i in range(len(pts)) if not dominated(i)]


# ------------------------------------------------------------------------------------- plots


def test_plot_all_on_random_records(tmp_path: Path, rng: random.Random) -> None:
    recs = synthetic_records(60, rng)
    csvs = [write_stats_csv(tmp_path / "run a.csv", 40, rng), write_stats_csv(tmp_path / "b.csv", 200, rng)]
    importances = {k: rng.random() for k in KNOBS}
    total = sum(importances.values())
    importances = {k: v / total for k, v in importances.items()}
    paths = plot_all(recs, tmp_path / "plots", importances=importances, stats_csvs=csvs)
    names = [p.name for p in paths]
    assert len(paths) == 2 * len(KNOBS) + 3 + 1 + 2 and len(set(names)) == len(names)
    assert "best_decode_tok_s_by_chunk_size.png" in names and "prefill_vs_decode.png" in names
    assert "decode_steps_run_a.png" in names and "param_importances.png" in names
    for p in paths:
        assert p.parent == tmp_path / "plots"
        assert_png(p)


def test_each_plot_function(tmp_path: Path, rng: random.Random) -> None:
    recs = synthetic_records(25, rng)
    assert_png(plot_best_by_knob(recs, "chunk_size", out_path=tmp_path / "a.png"))
    assert_png(plot_best_by_knob(recs, "backend", "prefill_tok_s", out_path=tmp_path / "b.png"))
    assert_png(plot_prefill_vs_decode(recs, tmp_path / "c.png"))
    assert_png(plot_history(recs, "decode_tok_s", tmp_path / "d.png"))
    assert_png(plot_param_importances({"chunk_size": 0.7, "backend": 0.3}, tmp_path / "e.png",
                                      metric="decode_tok_s"))
    assert_png(plot_decode_steps(write_stats_csv(tmp_path / "s.csv", 30, rng), tmp_path / "sub/f.png"))


@pytest.mark.parametrize("kind", ["empty", "all_failed", "all_infeasible"])
def test_degenerate_inputs_still_write_figures(tmp_path: Path, kind: str) -> None:
    if kind == "empty":
        recs: list[dict[str, Any]] = []
    else:
        recs = synthetic_records(8, random.Random(0))
        for r in recs:
            if kind == "all_failed":
                r.update(state="FAIL", prefill_tok_s=None, decode_tok_s=None, fidelity_passed=None)
            else:
                r.update(state="INFEASIBLE", prefill_tok_s=1000.0, decode_tok_s=10.0, fidelity_passed=False)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("step,dt_ms,cum_ms,inst_tok_s,avg_tok_s\n")
    paths = plot_all(recs, tmp_path, importances={}, stats_csvs=[header_only])
    assert len(paths) == 2 * len(KNOBS) + 3 + 1 + 1
    for p in paths:
        assert_png(p, min_bytes=4_000)


def test_best_by_knob_ignores_infeasible_and_failed(tmp_path: Path) -> None:
    # The infeasible trials are the fastest; they must not define the best bar.
    recs = [
        {"number": 0, "state": "COMPLETE", "chunk_size": 32, "decode_tok_s": 10.0, "fidelity_passed": True},
        {"number": 1, "state": "COMPLETE", "chunk_size": 32, "decode_tok_s": 12.0, "fidelity_passed": None},
        {"number": 2, "state": "INFEASIBLE", "chunk_size": 32, "decode_tok_s": 99.0, "fidelity_passed": False},
        {"number": 3, "state": "COMPLETE", "chunk_size": 64, "decode_tok_s": 50.0, "fidelity_passed": False},
        {"number": 4, "state": "FAIL", "chunk_size": 128, "decode_tok_s": None, "fidelity_passed": None},
        {"number": 5, "state": "COMPLETE", "chunk_size": 8, "decode_tok_s": 3.0, "fidelity_passed": True},
        {"number": 6, "state": "COMPLETE", "decode_tok_s": 1000.0, "fidelity_passed": True},  # no knob
    ]
    assert best_by_knob(recs, "chunk_size") == {
        8: (3.0, 1, 1), 32: (12.0, 2, 3), 64: (None, 0, 1), 128: (None, 0, 1),
    }
    assert best_by_knob(recs, "chunk_size", maximize=False)[32] == (10.0, 2, 3)
    assert best_by_knob([], "chunk_size") == {}
    assert_png(plot_best_by_knob(recs, "chunk_size", out_path=tmp_path / "k.png"), min_bytes=4_000)


def test_decode_steps_bad_csv_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("step,dt_ms\n0,1.0\n")
    with pytest.raises(UserError, match="lacks column"):
        plot_decode_steps(bad, tmp_path / "x.png")
    bad.write_text("step,dt_ms,cum_ms,inst_tok_s,avg_tok_s\n0,abc,1,1,1\n")
    with pytest.raises(UserError, match=r"bad.csv:2: column dt_ms"):
        plot_decode_steps(bad, tmp_path / "x.png")
    with pytest.raises(UserError, match="does not exist"):
        plot_decode_steps(tmp_path / "missing.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()  # nothing written half-way


# ------------------------------------------------------------------------------ what is drawn


def test_prefill_vs_decode_draws_the_records_and_separates_labels(rng: random.Random) -> None:
    recs = synthetic_records(40, rng)
    # a crowded front: ten trials within a few tok/s of one another, each beating the last on decode
    recs += [{"number": 100 + i, "state": "COMPLETE", "fidelity_passed": True, "prefill_tok_s": 50000.0 - i,
              "decode_tok_s": 90000.0 + i} for i in range(10)]
    fig = prefill_vs_decode_figure(recs)
    ax = fig.axes[0]
    feasible = sorted((r["prefill_tok_s"], r["decode_tok_s"]) for r in recs
                      if r.get("state") == "COMPLETE" and r.get("fidelity_passed") is not False
                      and r.get("prefill_tok_s") is not None and r.get("decode_tok_s") is not None)
    drawn = sorted(tuple(map(float, xy)) for xy in ax.collections[0].get_offsets())
    assert drawn == feasible  # every feasible trial is a dot, nothing else
    labels = [t for t in ax.texts if t.get_text().startswith("#")]
    assert {f"#{100 + i}" for i in range(10)} <= {t.get_text() for t in labels}
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    overlapping = [(a.get_text(), b.get_text()) for i, a in enumerate(labels) for j, b in enumerate(labels)
                   if i < j and boxes[i].overlaps(boxes[j])]
    assert not overlapping


def test_decode_steps_figure_draws_the_csv(tmp_path: Path, rng: random.Random) -> None:
    path = write_stats_csv(tmp_path / "s.csv", 30, rng)
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    fig = decode_steps_figure(path)
    step_line = fig.axes[0].lines[0]
    assert list(step_line.get_xdata()) == [float(r[0]) for r in rows]
    assert list(step_line.get_ydata()) == pytest.approx([float(r[1]) for r in rows])
    avg = fig.axes[1].lines[1]
    assert list(avg.get_ydata()) == pytest.approx([float(r[4]) for r in rows])


def test_decode_step_plots_of_every_trial_in_trial_order(tmp_path: Path, rng: random.Random) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    for n in rng.sample(range(11), 11):  # written in a random order
        write_stats_csv(outputs / f"trial_{n}_decode.csv", 5, rng)
    (outputs / "notes.csv").write_text("a,b\n1,2\n")  # not a stats CSV: left out
    found, note = _stats_csvs(outputs)
    assert [p.name for p in found] == [f"trial_{n}_decode.csv" for n in range(11)] and note is None
    paths = plot_all([], tmp_path / "plots", stats_csvs=found)
    steps = [p.name for p in paths if p.name.startswith("decode_steps_")]
    assert steps == [f"decode_steps_trial_{n}_decode.png" for n in range(11)]
