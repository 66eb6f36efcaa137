"""The search space of a study: which knobs are sampled, which combinations are valid, which are the same.

Three rules keep trials from being wasted (docs/STUDY.md "Search space"):

1. **Narrowed to the machine and model before the study starts.** Decode modes are cut to
   `available_decode_modes(device)`, `streams > 0` is dropped where the device has no streams, and
   `heads_per_band` is cut to the model's head count. A knob left with no value is a UserError.
2. **Conditional knobs: only live knobs are sampled.** A knob is sampled under a backend only where
   changing it changes what runs there, as counted in `RunStats` (tests/test_knob_liveness.py walks every
   pair `relevant` allows and checks that a measured count moves while the output does not):
   * `chunk_size`, all backends: for `queued`/`ray` the dispatch unit (a task is one chunk of one head
     band: tasks = chunks x bands), for `native` the chunkwise kernel's chunk length (chunks run).
   * `t_inner`: steps per step-block call (step-block calls per chunk) for `queued`/`ray`; for `native`
     only when the model has sLSTM blocks (mLSTM's chunkwise kernel has no inner steps).
   * `heads_per_band`: `queued`/`ray` (tasks, band widths, Ray actors); `native` runs one band of all heads.
   * `workers`: `queued` only (chunk tasks in flight at once); `ray` runs one actor per band, no pool.
   * `streams`: `queued` only, and only on devices with streams (tasks issued on side streams).
   * `decode_mode`, all backends: the decode step that runs (decode steps per path).
3. **Canonical configurations.** Irrelevant knobs take the default configuration's value, and `workers`
   and `streams` above the number of head bands are cut to it (threads or streams beyond the band count
   never get work). Two trials with the same canonical knobs are the same measurement: the second is
   answered from the first.

Objectives: a prefill objective is moved by PREFILL_KNOBS, a decode objective by decode_mode alone
(DECODE_KNOBS): benchmarks/decode_knobs.py measured backend and workers to leave decode within noise.

Combinations still invalid after that (`t_inner` not dividing `chunk_size`) are detected before a trial
starts and recorded as pruned with reason `invalid_combination`, without running anything.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import product
from typing import Any

from xlstm_tune.errors import UserError
from xlstm_tune.runtime.options import BACKENDS, KNOBS
from xlstm_tune.study.spec import Dimension, ExperimentSpec

DEFAULT_KNOBS = {"backend": "queued", "chunk_size": 32, "heads_per_band": 4, "workers": 4, "t_inner": 4,
                 "streams": 0, "decode_mode": "eager"}
PREFILL_KNOBS = ("backend", "chunk_size", "heads_per_band", "workers", "t_inner", "streams")
# Decode runs the decode mode's step function, never the prefill scheduler. Whether the scheduler a
# backend leaves alive (queued pool threads, Ray actors) slows it was measured (benchmarks/decode_knobs.py,
# docs/PERFORMANCE.md): backend and workers moved decode within the noise of an identical configuration,
# decode_mode by 5.5x. So only decode_mode is a decode knob.
DECODE_KNOBS = ("decode_mode",)
MAX_GRID = 20_000


def knob_key(knobs: Mapping[str, Any]) -> str:
    """A configuration's identity as one string, knobs in their canonical order."""
    return "|".join(f"{k}={knobs[k]}" for k in KNOBS)


def _bands(heads: int, per_band: int) -> int:
    return math.ceil(heads / min(per_band, heads)) if heads else 0


@dataclass
class SearchSpace:
    """A spec's space resolved for one model and device (see the module docstring)."""

    dims: dict[str, Dimension]
    fixed: dict[str, Any]
    num_heads: int
    slstm_num_heads: int = 0
    has_slstm: bool = False
    has_mlstm: bool = True
    notes: list[str] = field(default_factory=list)

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def resolve(cls, spec: ExperimentSpec, model_info: Mapping[str, Any], caps: Mapping[str, Any]) -> "SearchSpace":
        """Narrow the spec's space to the model and device; UserError when a knob is left with no value."""
        num_heads = int(model_info["num_heads"])
        notes: list[str] = []
        default = dict(DEFAULT_KNOBS, heads_per_band=min(DEFAULT_KNOBS["heads_per_band"], num_heads))
        fixed = {k: spec.fixed.get(k, default[k]) for k in KNOBS if k not in spec.space}
        dims: dict[str, Dimension] = {}
        modes = list(caps.get("decode_modes") or ["eager"])
        device = caps.get("device", "this device")

        def narrow(knob: str, keep: Any, why: str, fix: str) -> None:
            dim = spec.space[knob]
            values = dim.values()
            kept = [v for v in values if keep(v)]
            if not kept:
                raise UserError(f"[space] {knob}: none of {values} can run here ({why}): {fix}")
            dropped = [v for v in values if v not in kept]
            if dropped:
                notes.append(f"{knob}: dropped {dropped} ({why})")
                if dim.is_range and knob == "heads_per_band" and dim.step == 1 and not dim.log:
                    dims[knob] = Dimension(knob, None, dim.low, min(dim.high or num_heads, num_heads), 1, False)
                else:
                    dims[knob] = dim.with_values(kept)
            else:
                dims[knob] = dim

        for knob in KNOBS:
            if knob not in spec.space:
                continue
            if knob == "decode_mode":
                narrow(knob, lambda v: v in modes, f"{device} offers decode modes {modes}",
                       f"use decode_mode from {modes}")
            elif knob == "streams":
                narrow(knob, lambda v: v == 0 or bool(caps.get("streams")), f"{device} has no device streams",
                       "use streams = [0]")
            elif knob == "backend":
                backends = list(caps.get("backends") or BACKENDS)
                narrow(knob, lambda v: v in backends, f"this installation runs the backends {backends}",
                       f"use backend from {backends} (ray needs `pip install ray`)")
            elif knob == "heads_per_band":
                narrow(knob, lambda v: v <= num_heads, f"the model has {num_heads} heads per layer",
                       f"use heads_per_band values in 1..{num_heads}")
            else:
                dims[knob] = spec.space[knob]
        # fixed knobs must be runnable as they are
        if "backend" in fixed and fixed["backend"] not in list(caps.get("backends") or BACKENDS):
            raise UserError(f"backend={fixed['backend']} cannot run in this installation (available: "
                            f"{list(caps.get('backends') or BACKENDS)}): install its package or pick another backend")
        if "decode_mode" in fixed and fixed["decode_mode"] not in modes:
            raise UserError(f"decode_mode={fixed['decode_mode']} is not available on {device} (available: {modes}): "
                            f"fix [fixed] decode_mode or pass --decode-mode")
        if fixed.get("streams") and not caps.get("streams"):
            raise UserError(f"streams={fixed['streams']} asked for, but {device} has no device streams: use streams 0")
        if fixed.get("heads_per_band", 1) > num_heads and fixed.get("backend") != "native":
            raise UserError(f"heads_per_band={fixed['heads_per_band']} exceeds the model's {num_heads} heads: "
                            f"use a value in 1..{num_heads}")
        if spec.model.get("compile") and not caps.get("compile", True):
            raise UserError(f"compile = true needs torch.compile, which is not usable on {device}: "
                            f"set [model] compile = false or pass --no-compile")
        space = cls(dims=dims, fixed=fixed, num_heads=num_heads,
                    slstm_num_heads=int(model_info.get("slstm_num_heads") or 0),
                    has_slstm=bool(model_info.get("has_slstm")), has_mlstm=bool(model_info.get("has_mlstm", True)),
                    notes=notes)
        if space.size_valid() == 0:
            raise UserError("the search space has no valid configuration (t_inner must divide chunk_size): "
                            "add t_inner values that divide your chunk_size values")
        return space

    # ---- relevance and canonical form ------------------------------------------------------------
    def backends(self) -> list[str]:
        return list(self.dims["backend"].values()) if "backend" in self.dims else [self.fixed["backend"]]

    def relevant(self, knob: str, backend: str) -> bool:
        """Whether `knob` changes what runs under `backend` on this model."""
        if knob in ("backend", "chunk_size", "decode_mode"):
            return True
        if knob in ("workers", "streams"):
            return backend == "queued"
        if knob == "heads_per_band":
            return backend in ("queued", "ray")
        if knob == "t_inner":
            return backend != "native" or self.has_slstm
        raise KeyError(knob)

    def default_knobs(self) -> dict[str, Any]:
        """The runtime's built-in default configuration on this model (the baseline of every speed-up)."""
        return dict(DEFAULT_KNOBS, heads_per_band=min(DEFAULT_KNOBS["heads_per_band"], self.num_heads))

    def canonical(self, knobs: Mapping[str, Any]) -> dict[str, Any]:
        """Irrelevant knobs set to the default's values; workers and streams cut to the number of head bands."""
        k = dict(knobs)
        default = self.default_knobs()
        backend = k["backend"]
        for knob in ("heads_per_band", "workers", "streams"):
            if not self.relevant(knob, backend):
                k[knob] = default[knob]
        if not self.relevant("t_inner", backend):
            k["t_inner"] = math.gcd(default["t_inner"], int(k["chunk_size"]))
        if backend == "queued":
            bands = max(_bands(self.num_heads, k["heads_per_band"]) if self.has_mlstm else 0,
                        _bands(self.slstm_num_heads, k["heads_per_band"]) if self.has_slstm else 0, 1)
            k["workers"] = min(int(k["workers"]), bands)
            k["streams"] = min(int(k["streams"]), bands)  # band b issues on stream b mod streams
        return {name: k[name] for name in KNOBS}

    def knobs_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Full knob set from sampled params: fixed values first, then params (not yet canonical)."""
        knobs = dict(self.fixed)
        default = self.default_knobs()
        for knob in KNOBS:
            if knob in params:
                knobs[knob] = params[knob]
            elif knob not in knobs:
                knobs[knob] = default[knob]  # searched but not sampled (irrelevant to this backend)
        return knobs

    def params_key(self, params: Mapping[str, Any]) -> str:
        """The configuration a set of sampler params stands for, as a comparable key (`knob_key`)."""
        return knob_key(self.canonical(self.knobs_from_params(dict(params))))

    def check(self, knobs: Mapping[str, Any]) -> str | None:
        """Why this combination cannot run (None: it can). Checked before any trial starts."""
        if int(knobs["chunk_size"]) % int(knobs["t_inner"]) != 0:
            return f"t_inner={knobs['t_inner']} does not divide chunk_size={knobs['chunk_size']}"
        if knobs["backend"] != "native" and not 1 <= int(knobs["heads_per_band"]) <= self.num_heads:
            return f"heads_per_band={knobs['heads_per_band']} is outside 1..{self.num_heads}"
        if int(knobs["streams"]) and knobs["backend"] != "queued":
            return f"streams={knobs['streams']} only applies to the queued backend"
        return None

    # ---- sampling ------------------------------------------------------------------------------
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample the relevant knobs on an Optuna trial; returns the sampled params."""
        params: dict[str, Any] = {}
        backend = self._suggest(trial, "backend") if "backend" in self.dims else self.fixed["backend"]
        if "backend" in self.dims:
            params["backend"] = backend
        for knob in KNOBS:
            if knob == "backend" or knob not in self.dims or not self.relevant(knob, backend):
                continue
            params[knob] = self._suggest(trial, knob)
        return params

    def _suggest(self, trial: Any, knob: str) -> Any:
        dim = self.dims[knob]
        if dim.choices is not None:
            return trial.suggest_categorical(knob, list(dim.choices))
        return trial.suggest_int(knob, int(dim.low), int(dim.high), step=dim.step, log=dim.log)  # type: ignore[arg-type]

    def params_for(self, knobs: Mapping[str, Any]) -> dict[str, Any] | None:
        """Params that make the sampler produce a configuration equivalent to `knobs` (same canonical
        form), for enqueueing; None if the space cannot produce it."""
        target = self.canonical(knobs)
        params: dict[str, Any] = {}
        backend = knobs["backend"]
        for knob in KNOBS:
            if knob not in self.dims or not (knob == "backend" or self.relevant(knob, backend)):
                continue
            values = self.dims[knob].values()
            if knobs[knob] in values:
                params[knob] = knobs[knob]
                continue
            for v in values:  # an equivalent value (e.g. workers beyond the band count)
                trial_knobs = dict(knobs, **{knob: v})
                if self.canonical(trial_knobs)[knob] == target[knob]:
                    params[knob] = v
                    break
            else:
                return None
        if self.canonical(self.knobs_from_params(params)) != target:
            return None
        return params

    def grid(self) -> dict[str, list[Any]]:
        """Every searched knob's values, for Optuna's GridSampler."""
        size = 1
        for d in self.dims.values():
            size *= len(d.values())
        if size > MAX_GRID:
            raise UserError(f"the grid has {size} points (more than {MAX_GRID}): narrow the ranges or use another sampler")
        return {k: d.values() for k, d in self.dims.items()}

    def iter_configs(self) -> Iterator[dict[str, Any]]:
        """Every distinct valid canonical configuration of the space."""
        seen: set[str] = set()
        names = list(self.dims)
        for values in product(*(self.dims[n].values() for n in names)):
            knobs = self.canonical(self.knobs_from_params(dict(zip(names, values))))
            if self.check(knobs) is not None:
                continue
            key = knob_key(knobs)
            if key not in seen:
                seen.add(key)
                yield knobs

    def size_valid(self) -> int:
        """How many distinct valid configurations the space holds (0 stops the study before it starts)."""
        size = 1
        for d in self.dims.values():
            size *= len(d.values())
        if size > MAX_GRID:
            return size  # too many to enumerate; certainly not empty enough to matter
        return sum(1 for _ in self.iter_configs())

    def moved_by(self, objective: str) -> list[str]:
        """Searched knobs (with more than one value) that can change `objective`."""
        group = DECODE_KNOBS if objective.startswith("decode") else PREFILL_KNOBS
        return [k for k in group if k in self.dims and len(self.dims[k].values()) > 1]

    def describe(self) -> dict[str, Any]:
        return {
            "dims": {k: d.as_spec() for k, d in self.dims.items()},
            "fixed": dict(self.fixed),
            "num_heads": self.num_heads,
            "has_slstm": self.has_slstm,
            "valid_configs": self.size_valid(),
            "notes": list(self.notes),
        }
