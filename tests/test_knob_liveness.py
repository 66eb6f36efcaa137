"""Every (backend, knob) pair the search space can sample changes what runs, and never the result.

The pairs come from the space's own relevance rules (`SearchSpace.relevant`, after narrowing to this
device), so a new knob, or a knob made relevant to another backend, is walked here without editing a
list. For each pair the same token sequence runs under a base configuration and under one with only that
knob changed: the counts recorded where the work happened (`model.stats`) must differ, and both outputs
must match the canonical float32 step path.

The sequence covers ragged head bands (3 + 1 heads), batch 2, a prefill that is not a multiple of the
chunk size, a continuing prefill shorter than the chunk size (state carried across calls) and decode steps.
"""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from xlstm_tune import RuntimeOptions, load_model
from xlstm_tune.bench.workload import describe_model, device_capabilities
from xlstm_tune.runtime.options import KNOBS
from xlstm_tune.study.space import SearchSpace
from xlstm_tune.study.spec import parse_spec

TOL = 1e-4
# Two values per knob, the base first: chunk 8 does not divide the 13-token prefill and is longer than
# the 3-token continuation; 3 heads per band make a ragged last band of the model's 4.
VALUES = {"backend": ["queued", "native", "ray"], "chunk_size": [8, 4], "heads_per_band": [3, 1],
          "workers": [1, 2], "t_inner": [2, 1], "streams": [0, 2], "decode_mode": ["eager", "compiled"]}
CALLS = (13, 3, 1, 1)  # prefill, continuing prefill, two decode steps


def _space() -> SearchSpace:
    spec = parse_spec({"study": {"name": "liveness"}, "model": {"name": "tiny", "compile": False}, "space": VALUES})
    return SearchSpace.resolve(spec, describe_model("tiny"), device_capabilities("cpu"))


SPACE = _space()


def sampled_pairs(space: SearchSpace) -> list[tuple[str, str]]:
    """(backend, knob) for every knob the space samples with more than one value under that backend."""
    return [(backend, knob) for backend in space.backends() for knob in KNOBS
            if knob in space.dims and len(space.dims[knob].values()) > 1
            and (knob == "backend" or space.relevant(knob, backend))]


PAIRS = sampled_pairs(SPACE)


def _base(backend: str) -> dict:
    return SPACE.canonical(dict({k: v[0] for k, v in VALUES.items()}, backend=backend))


def _changed(base: dict, knob: str) -> dict:
    """The base with only `knob` moved to another value of the space (canonical, valid)."""
    for value in SPACE.dims[knob].values():
        knobs = SPACE.canonical(dict(base, **{knob: value}))
        if knobs[knob] != base[knob] and SPACE.check(knobs) is None:
            return knobs
    raise AssertionError(f"the space samples {knob} under {base['backend']}, yet no other value of it changes "
                         f"the canonical configuration {base}")


def _counts(stats: dict) -> dict:
    """The execution counts among the recorded stats (integers and per-path call counters)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, dict))}


@pytest.fixture(scope="module")
def model():
    m = load_model("tiny", device="cpu", runtime=RuntimeOptions(backend="native", compile=False))
    yield m
    m.close()


def _run(model, knobs: dict, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.runtime = RuntimeOptions(compile=False, **knobs)
    model.stats.reset()
    outs, state, t = [], None, 0
    for n in CALLS:
        out, state = model(ids[:, t:t + n], state)
        outs.append(out)
        t += n
    return torch.cat(outs, dim=1), model.stats.as_dict()


def test_every_knob_has_values_here_and_the_space_samples_them():
    # A new knob must get two values in VALUES before the space can be walked.
    assert set(VALUES) == set(KNOBS)
    knobs = {knob for _, knob in PAIRS}
    assert {"backend", "chunk_size", "heads_per_band", "workers", "t_inner", "decode_mode"} <= knobs
    assert ("native", "heads_per_band") not in PAIRS and ("ray", "workers") not in PAIRS
    assert "streams" not in knobs  # the CPU has no device streams: narrowed away before sampling


@pytest.mark.parametrize("backend,knob", PAIRS)
def test_knob_changes_what_runs_not_the_result(model, seed, request, backend, knob):
    base = _base(backend)
    changed = _changed(base, knob) if knob != "backend" else \
        SPACE.canonical(dict(base, backend=next(b for b in SPACE.backends() if b != backend)))
    if "ray" in (base["backend"], changed["backend"]):
        request.getfixturevalue("private_ray")
    ids = torch.randint(0, 256, (2, sum(CALLS)))
    ref, _ = model.reference_forward(ids)
    out_base, stats_base = _run(model, base, ids)
    out_changed, stats_changed = _run(model, changed, ids)
    assert rel_err(out_base, ref) < TOL, f"seed={seed} {base}"
    assert rel_err(out_changed, ref) < TOL, f"seed={seed} {changed}"
    before, after = _counts(stats_base), _counts(stats_changed)
    assert before != after, f"{knob} {base[knob]} -> {changed[knob]} under {backend} ran the same: {before}"
    if knob != "decode_mode":  # prefill knobs act through the prefill cells
        assert stats_base["tasks_dispatched"] > 0 and stats_changed["tasks_dispatched"] > 0
