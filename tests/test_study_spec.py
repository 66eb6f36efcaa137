"""Experiment specs, the resolved search space, failure classification (no model, no subprocess: fast)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from xlstm_tune.errors import MemoryAbort, UserError
from xlstm_tune.study.faults import classify_exception, describe_signal, parse_faults
from xlstm_tune.study.space import SearchSpace, knob_key
from xlstm_tune.study.spec import (
    apply_device_overrides,
    apply_overrides,
    load_spec,
    packaged_quickstart,
    parse_spec,
    read_toml,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"model_id": "tiny", "num_heads": 4, "slstm_num_heads": 4, "has_mlstm": True, "has_slstm": True,
        "config_hash": "x"}
CPU = {"device": "cpu", "device_type": "cpu", "decode_modes": ["eager", "compiled"], "streams": False,
       "compile": True, "graphs": False}


def _doc(**sections: dict) -> dict:
    doc = {"study": {"name": "t"}, "space": {"chunk_size": [16, 32]}}
    doc.update(copy.deepcopy(sections))
    return doc


# ---- the quickstart ---------------------------------------------------------------------------------
def test_quickstart_copies_identical_and_valid() -> None:
    packaged = packaged_quickstart()
    assert packaged.read_bytes() == (REPO / "experiments" / "quickstart.toml").read_bytes()
    spec = load_spec(None)
    assert spec.name == "quickstart" and spec.model["name"] == "tiny" and spec.model["compile"] is False
    assert spec.study["sampler"] == "tpe" and spec.objectives == ["prefill_tok_s", "decode_tok_s"]
    cpu = apply_device_overrides(spec, "cpu")
    assert cpu.space["decode_mode"].values() == ["eager"]
    assert spec.space["decode_mode"].values() == ["eager", "compiled", "graph"]  # untouched elsewhere


def test_every_shipped_experiment_parses() -> None:
    files = sorted((REPO / "experiments").glob("*.toml"))
    assert files
    for f in files:
        load_spec(f)


# ---- bad specs: one line naming the problem ---------------------------------------------------------
@pytest.mark.parametrize("doc, needle", [
    (_doc(space={"chunk_sizes": [16]}), "unknown knob 'chunk_sizes'"),
    (_doc(space={"chunk_size": []}), "empty list"),
    (_doc(space={"chunk_size": {"low": 64, "high": 16}}), "range is empty"),
    (_doc(space={"chunk_size": {"low": 8}}), "range must be"),
    (_doc(space={"backend": ["fast"]}), "unknown backend"),
    (_doc(space={"decode_mode": ["turbo"]}), "unknown decode_mode"),
    (_doc(space={"workers": [0]}), "workers must be >= 1"),
    (_doc(study={"name": "t", "sampler": "annealing"}), "unknown sampler 'annealing'"),
    (_doc(study={"name": "t", "objectives": ["latency"]}), "unknown objective 'latency'"),
    (_doc(study={"name": "t", "n_trials": 0}), "n_trials must be >= 1"),
    (_doc(benchh={}), "unknown section"),
    (_doc(bench={"repeat": 3}), "unknown key(s) ['repeat']"),
    (_doc(model={"dtype": "int8"}), "dtype 'int8'"),
    (_doc(device={"tpu": {}}), "unknown device type"),
    (_doc(device={"cpu": {"space": {"t_inner": []}}}), "empty list"),
    ({"study": {"name": "t"}, "space": {}}, "[space] is empty"),
    (_doc(study={"name": "t", "enqueue": {"backend": "native"}}), "enqueue must be a list of knob tables"),
    (_doc(study={"name": "t", "enqueue": [{"backend": "native", "chunk": 64}]}), "enqueue entry 1: unknown knob(s) ['chunk']"),
    (_doc(pruning={"screen_margin": 0.5}), "[pruning] screen_margin must be >= 1 (a factor), got 0.5"),
])
def test_bad_spec_is_one_line_user_error(doc: dict, needle: str) -> None:
    with pytest.raises(UserError) as exc:
        parse_spec(doc, "x.toml")
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and "x.toml" in msg


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[study\nname = 1\n")
    with pytest.raises(UserError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(UserError, match="not found"):
        load_spec(tmp_path / "missing.toml")


def test_overrides_and_aliases() -> None:
    spec = parse_spec(_doc(space={"backend": ["queued_compiled_steps", "native"], "chunk_size": {"low": 16, "high": 64, "step": 16}}))
    assert spec.space["backend"].values() == ["queued", "native"]
    assert spec.space["chunk_size"].values() == [16, 32, 48, 64]
    s2 = apply_overrides(spec, sampler="nsga2", n_trials=3, knobs={"backend": ["native"], "workers": [1, 2]},
                         context_lens=[64, 128], objectives=["prefill_tok_s_ctx64"])
    assert s2.study["sampler"] == "ga" and s2.study["n_trials"] == 3
    assert s2.space["backend"].values() == ["native"] and s2.space["workers"].values() == [1, 2]
    assert s2.context_lens == [64, 128] and s2.objectives == ["prefill_tok_s_ctx64"]
    assert spec.space["backend"].values() == ["queued", "native"]  # the original is not modified
    with pytest.raises(UserError, match="unknown sampler"):
        apply_overrides(spec, sampler="sobol")
    with pytest.raises(UserError, match="unknown objective"):
        apply_overrides(spec, objectives=["prefill_tok_s_ctx999"])
    # the identity used to refuse resuming with other settings ignores the trial count and sampler
    assert spec.measurement_identity() == apply_overrides(spec, n_trials=50, sampler="random").measurement_identity()
    assert spec.measurement_identity() != apply_overrides(spec, context_lens=[8]).measurement_identity()


# ---- the search space -----------------------------------------------------------------------------
def _space(space: dict, fixed: dict | None = None, caps: dict = CPU, info: dict = TINY) -> SearchSpace:
    doc = _doc(space=space)
    if fixed:
        doc["fixed"] = fixed
    return SearchSpace.resolve(parse_spec(doc), info, caps)


def test_space_is_narrowed_to_device_and_model() -> None:
    sp = _space({"decode_mode": ["eager", "compiled", "graph"], "streams": [0, 2], "heads_per_band": [1, 2, 4, 8]})
    assert sp.dims["decode_mode"].values() == ["eager", "compiled"]
    assert sp.dims["streams"].values() == [0]
    assert sp.dims["heads_per_band"].values() == [1, 2, 4]
    assert len(sp.notes) == 3
    with pytest.raises(UserError, match="decode_mode"):
        _space({"decode_mode": ["graph"]})
    with pytest.raises(UserError, match="heads_per_band"):
        _space({"heads_per_band": [8, 16]})
    with pytest.raises(UserError, match="no valid configuration"):
        _space({"chunk_size": [16], "t_inner": [32]})


def test_backends_the_installation_cannot_run_leave_the_space() -> None:
    """Without the ray package the ray backend is dropped before the study starts, not failed per trial."""
    no_ray = dict(CPU, backends=["native", "queued"])
    sp = _space({"backend": ["native", "queued", "ray"]}, caps=no_ray)
    assert sp.dims["backend"].values() == ["native", "queued"]
    assert any("backend: dropped ['ray']" in n for n in sp.notes)
    with pytest.raises(UserError, match="ray"):
        _space({"backend": ["ray"]}, caps=no_ray)
    with pytest.raises(UserError, match="backend=ray cannot run"):
        _space({"chunk_size": [32]}, fixed={"backend": "ray"}, caps=no_ray)
    assert _space({"backend": ["native", "ray"]}).dims["backend"].values() == ["native", "ray"]


def test_relevance_canonical_form_and_invalid_combinations() -> None:
    sp = _space({"backend": ["native", "queued"], "chunk_size": [16, 32], "heads_per_band": [1, 2, 4],
                 "workers": [1, 2, 4], "t_inner": [1, 4, 8, 32]})
    assert sp.relevant("workers", "queued") and not sp.relevant("workers", "native")
    assert not sp.relevant("heads_per_band", "native") and sp.relevant("heads_per_band", "ray")
    assert sp.relevant("t_inner", "native")  # tiny has sLSTM blocks, which step under native too
    no_slstm = _space({"backend": ["native"]}, info=dict(TINY, has_slstm=False))
    assert not no_slstm.relevant("t_inner", "native")
    a = sp.canonical(sp.knobs_from_params({"backend": "native", "chunk_size": 32, "t_inner": 8}))
    b = sp.canonical(sp.knobs_from_params({"backend": "native", "chunk_size": 32, "t_inner": 8, "workers": 2}))
    assert knob_key(a) == knob_key(b) and a["workers"] == sp.default_knobs()["workers"]
    # workers beyond the number of head bands do nothing: hpb=4 on 4 heads is one band
    q = sp.canonical(sp.knobs_from_params({"backend": "queued", "chunk_size": 32, "heads_per_band": 4, "workers": 4, "t_inner": 8}))
    assert q["workers"] == 1
    assert sp.check(sp.knobs_from_params({"backend": "queued", "chunk_size": 16, "t_inner": 32})) is not None
    assert sp.check(sp.knobs_from_params({"backend": "queued", "chunk_size": 32, "t_inner": 8})) is None
    configs = list(sp.iter_configs())
    assert len({knob_key(c) for c in configs}) == len(configs) == sp.size_valid()
    assert all(sp.check(c) is None for c in configs)
    # the default configuration can be enqueued through an equivalent value (workers 4 -> 1 band)
    params = sp.params_for(sp.default_knobs())
    assert params is not None and sp.canonical(sp.knobs_from_params(params)) == sp.canonical(sp.default_knobs())


def test_objective_movers() -> None:
    sp = _space({"backend": ["native", "queued"], "chunk_size": [16, 32], "decode_mode": ["eager"]})
    assert "chunk_size" in sp.moved_by("prefill_tok_s")
    assert sp.moved_by("decode_tok_s") == []  # decode runs the decode step: only decode_mode moves it
    assert _space({"backend": ["native", "queued"], "decode_mode": ["eager", "compiled"]}).moved_by("decode_tok_s") \
        == ["decode_mode"]
    only_chunk = _space({"chunk_size": [16, 32]})
    assert only_chunk.moved_by("decode_tok_s") == []


def test_suggest_only_relevant_knobs() -> None:
    import optuna

    sp = _space({"backend": ["native", "queued"], "chunk_size": [16, 32], "workers": [1, 2], "heads_per_band": [1, 2]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(20):
        t = study.ask()
        params = sp.suggest(t)
        if params["backend"] == "native":
            assert "workers" not in params and "heads_per_band" not in params
        else:
            assert {"workers", "heads_per_band"} <= set(params)
        seen.add(params["backend"])
        study.tell(t, 1.0)
    assert seen == {"native", "queued"}


# ---- failures -------------------------------------------------------------------------------------
def test_fault_spec_parsing() -> None:
    assert parse_faults("3:crash, 4:compile_error,5:memory_abort,6:timeout") == {
        3: "crash", 4: "compile_error", 5: "memory_abort", 6: "timeout"}
    assert parse_faults("") == {} and parse_faults(None) == {}
    for bad in ("x:crash", "3:explode", "3crash"):
        with pytest.raises(UserError, match="XLSTM_TUNE_INJECT_FAULT"):
            parse_faults(bad)


def test_exception_classification() -> None:
    torch = pytest.importorskip("torch")
    import torch._dynamo.exc as dexc
    import torch.fx

    assert classify_exception(MemoryAbort("x")) == "memory_abort"
    assert classify_exception(torch.OutOfMemoryError("CUDA out of memory")) == "oom"
    assert classify_exception(RuntimeError("DefaultCPUAllocator: can't allocate memory")) == "oom"
    assert classify_exception(dexc.InternalTorchDynamoError("boom")) == "compile_error"

    def branchy(x):  # data-dependent control flow: FX raises a plain error from inside torch.fx
        return x if x.sum() > 0 else -x

    try:
        torch.fx.symbolic_trace(branchy)
    except Exception as exc:  # noqa: BLE001
        assert not type(exc).__module__.startswith("torch._dynamo")
        assert classify_exception(exc) == "compile_error"
    else:
        raise AssertionError("symbolic_trace should have failed")
    assert classify_exception(UserError("streams not available")) == "invalid_combination"
    assert classify_exception(ValueError("other")) == "error"
    try:  # a MemoryAbort wrapped by another exception is still a memory abort
        try:
            raise MemoryAbort("hard limit")
        except MemoryAbort as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert classify_exception(outer) == "memory_abort"
    assert "SIGSEGV" in describe_signal(-11) and "exit code 3" == describe_signal(3)
