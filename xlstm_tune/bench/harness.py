"""Prefill and decode throughput of one LanguageModel configuration (docs/DESIGN.md §5).

    settings = BenchSettings(warmup=1, repeats=5)
    pre = bench_prefill(model, ids, settings)            # tok/s median, p20/p80, CV; compile time apart
    dec = bench_decode(model, prompt, 32, settings)      # decode tok/s over 32 new tokens (x rows of prompt)
    report = run_benchmark(model, [512, 2048], PromptSource(), 32, settings)   # both, every length

How each figure is made:

* The device is synchronised before every clock read (`bench.timing`, with `runtime.device.synchronize`).
* The first call of every timed path (prefill at each length, decode) is timed on its own: it includes
  compilation (torch.compile, graph capture), which users pay on every fresh process. `compile_s` is that
  first call minus the steady-state median. Then `warmup` more untimed calls, then `repeats` timed calls.
* Figures are the median with p20/p80 and the CV of the tok/s samples; when the CV is above `max_cv` the
  measurement is repeated (up to `max_rounds` rounds) and, if still noisy, flagged `cv_high`.
* The machine's load is recorded for every figure (`bench.load`: CPU time other processes took on our
  CPUs, load average, GPU clocks/utilisation where readable); a figure taken on a busy machine is
  measured again (`busy_retries` times at most) and flagged `busy_machine` if the load persists.
* What ran is recorded (`model.stats`) and checked against what the knobs ask for: a prefill that ran a
  different kernel path than the backend's raises `PathMismatchError` instead of reporting a figure for
  the wrong path. A prompt shorter than `chunk_size` is flagged: the chunk_size knob cannot act on it.

Decode throughput is measured from a prefilled state: `model.generate(last_token, n, state)` runs exactly
`n` steps of the decode mode's step function (prefill is not part of the decode figure). A prompt of B
rows decodes B sequences at once: tok/s counts B x n tokens (`batch_size` is recorded with the figure).

This module measures; it never decides (the study does) and never imports tracking/, study/ or cli/.
"""
from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from xlstm_tune.bench.load import DEFAULT_MAX_OTHER_CPU, LoadSample, measure_unloaded
from xlstm_tune.bench.stats import Summary
from xlstm_tune.bench.timing import Measurement, measure, throughput, time_first_call
from xlstm_tune.bench.workload import PromptSource, prompt_ids
from xlstm_tune.errors import UserError
from xlstm_tune.runtime.state import clone_state

DECODE_CSV_COLUMNS = ("step", "dt_ms", "cum_ms", "inst_tok_s", "avg_tok_s")

# What a measurement is doing right now, `(stage, detail)`: e.g. ("prefill 2048", "timed call 2/3"). A
# long trial is otherwise silent for minutes; the study's progress display shows these.
PhaseCallback = Callable[[str, str], None]


def _announcer(on_phase: PhaseCallback | None, stage: str, settings: BenchSettings,
               compiling: bool) -> Callable[[], None] | None:
    """What to run before each call of a measurement (outside its timed interval) to announce it: the
    first call (where compilation happens), warm-up, timed."""
    if on_phase is None:
        return None
    count = [0]

    def announce() -> None:
        k = count[0]
        count[0] += 1
        if k == 0:
            detail = "first call (compiles)" if compiling else "first call"
        elif k <= settings.warmup:
            detail = f"warm-up {k}/{settings.warmup}"
        elif k - settings.warmup <= settings.repeats:
            detail = f"timed call {k - settings.warmup}/{settings.repeats}"
        else:  # another round (noisy figures) or a busy machine's re-measurement
            detail = f"timed call {k - settings.warmup} (re-measuring)"
        on_phase(stage, detail)

    return announce


class PathMismatchError(RuntimeError):
    """A measured call ran other kernels than the knobs ask for: its figure would describe the wrong path."""


@dataclass(frozen=True)
class BenchSettings:
    """How hard to measure. `warmup` untimed calls follow the (separately timed) first call."""

    warmup: int = 1
    repeats: int = 5
    max_cv: float = 0.10
    max_rounds: int = 3
    busy_retries: int = 1
    max_other_cpu: float = DEFAULT_MAX_OTHER_CPU

    def __post_init__(self) -> None:
        for name, low in (("warmup", 0), ("repeats", 1), ("max_rounds", 1), ("busy_retries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.max_cv, bool) or not isinstance(self.max_cv, (int, float)) or not self.max_cv > 0:
            raise UserError(f"max_cv must be a number > 0 (e.g. 0.1 for 10%), got {self.max_cv!r}")
        if isinstance(self.max_other_cpu, bool) or not isinstance(self.max_other_cpu, (int, float)) \
                or not self.max_other_cpu > 0:
            raise UserError(f"max_other_cpu must be a number > 0 (a fraction of this process's CPUs), "
                            f"got {self.max_other_cpu!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"warmup": self.warmup, "repeats": self.repeats, "max_cv": self.max_cv, "max_rounds": self.max_rounds,
                "busy_retries": self.busy_retries, "max_other_cpu": self.max_other_cpu}

    def measure(self, fn: Callable[[], Any], sync: Callable[[], None], device: Any,
                before: Callable[[], None] | None = None) -> tuple[Measurement, LoadSample]:
        """`bench.timing.measure` with these settings, re-measured while the machine is busy."""
        m, load, _ = measure_unloaded(
            lambda: measure(fn, sync=sync, warmup=self.warmup, repeats=self.repeats, max_cv=self.max_cv,
                            max_rounds=self.max_rounds, before=before),
            device=device, max_other_cpu=self.max_other_cpu, retries=self.busy_retries)
        return m, load


# ---- what must run ---------------------------------------------------------------------------------
def expected_kernel_paths(options: Any, *, has_mlstm: bool = True, has_slstm: bool = False) -> set[str]:
    """The prefill kernel paths `options` must produce on a model with these block kinds."""
    suffix = "compiled" if options.compile else "eager"
    paths = set()
    if has_mlstm:
        paths.add(f"mlstm.{'chunkwise' if options.backend == 'native' else 'step_block'}.{suffix}")
    if has_slstm:
        paths.add(f"slstm.step_block.{suffix}")
    return paths


def check_prompt(n_tokens: int, options: Any) -> list[str]:
    """Flags for a prompt that cannot exercise the knobs (empty list: the prompt is long enough)."""
    flags = []
    if n_tokens < options.chunk_size:
        flags.append(
            f"short_prompt: {n_tokens} tokens < chunk_size={options.chunk_size}: only one partial chunk runs, "
            f"so chunk_size has no effect at this length (use a prompt of >= {options.chunk_size} tokens)"
        )
    return flags


def _check_lengths(knob: str, size: int, lengths: set[int], what: str) -> None:
    """Measured piece lengths fit a knob of `size`: none longer, and a shorter one only as a ragged tail
    (so with more than one length, `size` itself must be among them)."""
    if lengths and (max(lengths) > size or (len(lengths) > 1 and size not in lengths)):
        raise PathMismatchError(f"{knob}={size} asked for, but {what} of {sorted(lengths)} steps ran")


def _check_pieces(knob: str, size: int, lengths: set[int], spans_of: set[int], what: str) -> None:
    """Measured piece lengths are what `size` makes of the longer runs they were cut from (`spans_of`: the
    prompt pieces for chunks, those and the chunks for step-blocks): full pieces of `size` and ragged tails."""
    from xlstm_tune.runtime.tiles import spans

    allowed = {n for total in spans_of for _, n in spans(total, size)}
    if lengths - allowed:
        raise PathMismatchError(f"{knob}={size} asked for, but {what} of {sorted(lengths)} steps ran "
                                f"(from runs of {sorted(spans_of)} steps)")


def verify_stats(options: Any, stats: dict[str, Any], *, has_mlstm: bool = True, has_slstm: bool = False,
                 prefill_graph: bool | None = None) -> None:
    """Raise PathMismatchError unless the recorded run used the kernels and sizes `options` ask for.

    Everything checked was counted where the work happened (runtime.tiles.RunStats), not read back from
    the options: kernel paths, lengths of the chunks and step-blocks that ran, band widths, for the
    step-tile backends one task per chunk of one band, and (`prefill_graph` given: whether the switch is
    in force here) whether the prefills replayed a device graph or launched their calls.
    """
    if prefill_graph is not None:
        paths = set(stats.get("prefill_paths") or {})
        graph = prefill_graph and options.backend == "native"
        want = {"graph:replay"} if graph else {"call"}
        if paths - {"graph:capture"} != want:
            raise PathMismatchError(f"backend={options.backend} with prefill_graph={'on' if prefill_graph else 'off'} "
                                    f"should prefill by {sorted(want)} but ran {sorted(paths)}")
    ran = set(stats.get("kernel_paths") or {})
    want = expected_kernel_paths(options, has_mlstm=has_mlstm, has_slstm=has_slstm)
    if ran != want:
        raise PathMismatchError(
            f"backend={options.backend} compile={options.compile} should run {sorted(want)} but ran {sorted(ran)}"
        )
    chunks = set(stats.get("chunk_lengths") or [])
    pieces = set(stats.get("prefill_lengths") or [])
    if len(pieces) > 1:  # prompts fed in pieces (prefill_segment): each piece has its own ragged tail
        _check_pieces("chunk_size", options.chunk_size, chunks, pieces, "chunks")
        if options.backend != "native" or has_slstm:
            _check_pieces("t_inner", options.t_inner, set(stats.get("step_block_lengths") or []), chunks | pieces,
                          "step-blocks")
    else:
        _check_lengths("chunk_size", options.chunk_size, chunks, "chunks")
        if options.backend != "native" or has_slstm:
            _check_lengths("t_inner", options.t_inner, set(stats.get("step_block_lengths") or []), "step-blocks")
    widths = set(stats.get("band_widths") or [])
    if options.backend != "native" and widths and max(widths) > options.heads_per_band:
        raise PathMismatchError(f"heads_per_band={options.heads_per_band} asked for, but bands of {sorted(widths)} ran")
    if options.backend != "native" and stats.get("tasks_dispatched", 0) != stats.get("chunks_run", 0):
        raise PathMismatchError(f"backend={options.backend} should dispatch one task per chunk of one band, but "
                                f"{stats.get('tasks_dispatched')} tasks ran {stats.get('chunks_run')} chunks")


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class TimedResult:
    """What every measured call reports: throughput, wall time, first-call and compile time, stability."""

    tok_s: Summary
    seconds: Summary
    first_call_s: float
    compile_s: float
    rounds: int
    cv_high: bool

    @property
    def busy(self) -> bool:
        return bool(getattr(self, "load", {}).get("busy"))


BUSY_FLAG = "busy_machine"


def _timing(items: int, first: float, m: Measurement) -> dict[str, Any]:
    """TimedResult's fields from a measurement of calls that each process `items` tokens."""
    return dict(tok_s=throughput(items, m), seconds=m.summary, first_call_s=first,
                compile_s=max(0.0, first - m.summary.median), rounds=m.rounds, cv_high=m.cv_high)


@dataclass
class PrefillResult(TimedResult):
    context_len: int
    tokens: int
    stats: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    load: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Columns `prefill_tok_s_ctx<L>` (+ _p20/_p80/_cv/_n), `prefill_s_ctx<L>`, first-call and compile time,
        `prefill_path_ctx<L>`."""
        sfx = f"_ctx{self.context_len}"
        out: dict[str, Any] = {}
        for key, value in self.tok_s.as_dict("prefill_tok_s").items():
            out[key.replace("prefill_tok_s", "prefill_tok_s" + sfx, 1)] = value
        out["prefill_s" + sfx] = self.seconds.median
        out["prefill_first_call_s" + sfx] = self.first_call_s
        out["prefill_compile_s" + sfx] = self.compile_s
        out["prefill_rounds" + sfx] = self.rounds
        out["prefill_cv_high" + sfx] = self.cv_high
        out["prefill_path" + sfx] = self.path
        out.update(_load_columns("prefill", sfx, self.load))
        return out

    @property
    def path(self) -> str:
        """How the measured prefills ran, as counted: `graph` (replays of a captured device graph) or `call`."""
        return "graph" if (self.stats.get("prefill_paths") or {}).get("graph:replay") else "call"


@dataclass
class DecodeResult(TimedResult):
    new_tokens: int
    context_len: int
    steps: list[dict[str, float]] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    path: str = ""  # LanguageModel.decode_path: which step ran
    batch_size: int = 1  # sequences decoded together; tok_s counts batch_size x new_tokens per call
    load: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.tok_s.as_dict("decode_tok_s"))
        out.update(decode_path=self.path, decode_s=self.seconds.median, decode_first_call_s=self.first_call_s,
                   decode_compile_s=self.compile_s, decode_rounds=self.rounds, decode_cv_high=self.cv_high,
                   decode_new_tokens=self.new_tokens, decode_context_len=self.context_len,
                   decode_batch_size=self.batch_size)
        out.update(_load_columns("decode", "", self.load))
        return out


def _load_columns(phase: str, sfx: str, load: dict[str, Any]) -> dict[str, Any]:
    """Flat load columns of one figure: `<phase>_busy`, `<phase>_other_cpu_frac`, `<phase>_loadavg`, GPU."""
    if not load:
        return {}
    out = {f"{phase}_busy{sfx}": bool(load.get("busy")), f"{phase}_other_cpu_frac{sfx}": load.get("other_cpu_frac"),
           f"{phase}_loadavg{sfx}": load.get("loadavg_1m")}
    for key, value in (load.get("accelerator") or {}).items():
        out[f"{phase}_{key}{sfx}"] = value
    return out


def _sync(model: Any) -> Callable[[], None]:
    from xlstm_tune.runtime import device as dev

    device = model.device
    return lambda: dev.synchronize(device)


# ---- prefill ---------------------------------------------------------------------------------------
def bench_prefill(model: Any, ids: Any, settings: BenchSettings, *, model_info: dict[str, Any] | None = None,
                  on_phase: PhaseCallback | None = None, stage: str | None = None) -> PrefillResult:
    """Prefill throughput of `model` on `ids` [B, S] with its current runtime knobs (state starts empty);
    `on_phase(stage, detail)` hears of every call (`stage` defaults to "prefill <S>")."""
    info = model_info or {}
    options = model.runtime
    sync = _sync(model)
    n_tokens = int(ids.shape[-1])
    flags = check_prompt(n_tokens, options)

    def call() -> None:
        model(ids)

    announce = _announcer(on_phase, stage or f"prefill {n_tokens}", settings, bool(options.compile))
    model.stats.reset()
    first = time_first_call(call, sync, before=announce)
    m, load = settings.measure(call, sync, model.device, before=announce)
    stats = model.stats.as_dict()
    from xlstm_tune.runtime.device import prefill_graphs_enabled

    verify_stats(options, stats, has_mlstm=info.get("has_mlstm", True), has_slstm=info.get("has_slstm", False),
                 prefill_graph=prefill_graphs_enabled(model.device))
    return PrefillResult(context_len=n_tokens, tokens=int(ids.numel()), **_timing(int(ids.numel()), first, m),
                         stats=stats, flags=flags, load=load.as_dict())


# ---- decode ----------------------------------------------------------------------------------------
def decode_step_rows(step_seconds: Sequence[tuple[int, float]], batch_size: int = 1) -> list[dict[str, float]]:
    """Per-step rows `step,dt_ms,cum_ms,inst_tok_s,avg_tok_s` from `(step, seconds)` pairs; a step of
    `batch_size` rows makes that many tokens."""
    rows: list[dict[str, float]] = []
    cum = 0.0
    for i, (step, dt) in enumerate(step_seconds, start=1):
        cum += dt
        rows.append({
            "step": int(step),
            "dt_ms": dt * 1000.0,
            "cum_ms": cum * 1000.0,
            "inst_tok_s": (batch_size / dt) if dt > 0 else math.inf,
            "avg_tok_s": (batch_size * i / cum) if cum > 0 else math.inf,
        })
    return rows


def write_decode_csv(path: str | Path, rows: Sequence[dict[str, float]]) -> Path:
    """The runner's `--stats-log` format: `step,dt_ms,cum_ms,inst_tok_s,avg_tok_s`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(DECODE_CSV_COLUMNS)
        for r in rows:
            writer.writerow([r["step"], f"{r['dt_ms']:.4f}", f"{r['cum_ms']:.4f}",
                             f"{r['inst_tok_s']:.3f}", f"{r['avg_tok_s']:.3f}"])
    return p


def bench_decode(model: Any, prompt: Any, new_tokens: int, settings: BenchSettings, *, record_steps: bool = True,
                 on_phase: PhaseCallback | None = None) -> DecodeResult:
    """Decode throughput over `new_tokens` greedy steps after prefilling `prompt` [B, S] once: B sequences
    decode together, and tok/s counts B x `new_tokens` tokens per call.

    Each timed call decodes from its own copy of the prefilled state. With `record_steps`, one more
    (untimed-for-the-figure) run records per-step times for the decode stats CSV and the tokens.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise UserError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
    sync = _sync(model)
    stage = f"decode {new_tokens} tokens"
    if on_phase is not None:
        on_phase(stage, f"prefilling the {int(prompt.shape[-1])}-token prompt")
    logits, state0 = model(prompt)
    first_token = logits[:, -1:].argmax(-1)
    sync()

    def call() -> None:
        model.generate(first_token, new_tokens, state=clone_state(state0))

    announce = _announcer(on_phase, stage, settings, bool(getattr(model.runtime, "compile", False)))
    first = time_first_call(call, sync, before=announce)
    m, load = settings.measure(call, sync, model.device, before=announce)
    steps: list[tuple[int, float]] = []
    tokens: list[int] = []
    if record_steps:
        if on_phase is not None:
            on_phase(stage, "recording per-step times")
        out, _ = model.generate(first_token, new_tokens, state=clone_state(state0),
                                on_step=lambda n, dt: steps.append((n, dt)))
        tokens = [int(first_token[0, 0])] + [int(t) for t in out[0].tolist()]  # row 0's
    batch = int(prompt.shape[0])
    return DecodeResult(
        new_tokens=new_tokens, context_len=int(prompt.shape[-1]), **_timing(new_tokens * batch, first, m),
        steps=decode_step_rows(steps, batch), tokens=tokens, path=getattr(model, "decode_path", ""), batch_size=batch,
        load=load.as_dict(),
    )


# ---- fidelity inputs (the comparison itself lives in quality/) ---------------------------------------
def reference_outputs(model: Any, ids: Any, decode_steps: int) -> tuple[Any, list[int]]:
    """Canonical logits for `ids` then `decode_steps` greedy tokens, on the float32 step path.

    Returns (logits [B, S + decode_steps, V] float32 on the CPU, the greedy tokens fed after the prompt).
    """
    import torch

    logits, state = model.reference_forward(ids)
    parts = [logits.float().cpu()]
    tokens: list[int] = []
    token = logits[:, -1:].argmax(-1)
    for _ in range(decode_steps):
        tokens.append(int(token.flatten()[0]))
        step_logits, state = model.reference_forward(token, state)
        parts.append(step_logits.float().cpu())
        token = step_logits[:, -1:].argmax(-1)
    return torch.cat(parts, dim=1), tokens


def candidate_outputs(model: Any, ids: Any, tokens: Sequence[int]) -> Any:
    """The same logits through the configured knobs: prefill `ids`, then decode `tokens` (teacher-forced).

    Decoding the reference's tokens (not the candidate's own) keeps both sequences aligned, so a single
    drift shows as a logit error instead of a different continuation.
    """
    import torch

    logits, state = model(ids)
    parts = [logits.float().cpu().clone()]
    for tok in tokens:
        step = torch.full((ids.shape[0], 1), int(tok), dtype=torch.long, device=model.device)
        step_logits, state = model(step, state)
        parts.append(step_logits.float().cpu().clone())  # graph decode reuses its output buffer
    return torch.cat(parts, dim=1)


# ---- everything for one configuration --------------------------------------------------------------
def geomean(values: Sequence[float]) -> float:
    """Geometric mean of positive values (the aggregate prefill figure across context lengths)."""
    vals = [float(v) for v in values]
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        return math.nan
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


@dataclass
class BenchReport:
    """One configuration measured at every prefill length plus decode."""

    knobs: dict[str, Any]
    prefill: list[PrefillResult]
    decode: DecodeResult | None
    wall_s: float
    prompt: dict[str, Any]

    @property
    def flags(self) -> list[str]:
        seen: list[str] = []
        for p in self.prefill:
            for f in p.flags:
                tagged = f"ctx{p.context_len}: {f}"
                if tagged not in seen:
                    seen.append(tagged)
            if p.busy:
                seen.append(f"ctx{p.context_len}: {BUSY_FLAG}")
        if self.decode is not None and self.decode.busy:
            seen.append(f"decode: {BUSY_FLAG}")
        return seen

    @property
    def busy_machine(self) -> bool:
        """Some figure of this report was taken on a busy machine (after its re-measurements)."""
        return any(p.busy for p in self.prefill) or (self.decode is not None and self.decode.busy)

    def flat(self) -> dict[str, Any]:
        """Flat metrics: per-length columns, the geometric-mean `prefill_tok_s`, decode columns, compile_s."""
        out: dict[str, Any] = {}
        for p in self.prefill:
            out.update(p.flat())
        if self.prefill:
            out["prefill_tok_s"] = geomean([p.tok_s.median for p in self.prefill])
            out["prefill_s"] = sum(p.seconds.median for p in self.prefill)
        compile_s = sum(p.compile_s for p in self.prefill)
        if self.decode is not None:
            out.update(self.decode.flat())
            compile_s += self.decode.compile_s
        out["compile_s"] = compile_s
        out[BUSY_FLAG] = self.busy_machine
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "knobs": dict(self.knobs),
            "prompt": dict(self.prompt),
            "metrics": self.flat(),
            "prefill": [
                {"context_len": p.context_len, "tok_s": p.tok_s.metric_dict(), "seconds": p.seconds.metric_dict(),
                 "first_call_s": p.first_call_s, "compile_s": p.compile_s, "rounds": p.rounds,
                 "cv_high": p.cv_high, "stats": p.stats, "flags": p.flags, "load": p.load}
                for p in self.prefill
            ],
            "decode": None if self.decode is None else {
                "new_tokens": self.decode.new_tokens, "context_len": self.decode.context_len,
                "batch_size": self.decode.batch_size, "path": self.decode.path,
                "tok_s": self.decode.tok_s.metric_dict(), "seconds": self.decode.seconds.metric_dict(),
                "first_call_s": self.decode.first_call_s, "compile_s": self.decode.compile_s,
                "rounds": self.decode.rounds, "cv_high": self.decode.cv_high, "load": self.decode.load,
            },
            "flags": self.flags,
            "wall_s": self.wall_s,
        }


def run_benchmark(
    model: Any,
    lengths: Sequence[int | None],
    source: PromptSource,
    new_tokens: int,
    settings: BenchSettings,
    *,
    decode_context_len: int | None = None,
    model_info: dict[str, Any] | None = None,
    prompts: dict[Any, Any] | None = None,
    record_steps: bool = True,
    batch_size: int = 1,
    on_stage: Callable[[str, Any], bool] | None = None,
    on_phase: PhaseCallback | None = None,
) -> BenchReport:
    """Prefill at every length (None: the text prompt's own length), then decode `new_tokens` (0: skip).

    Decode starts from a prompt of `decode_context_len` tokens (default: the shortest length), with
    `batch_size` different prompts decoded together (prefill is measured at batch 1).
    `prompts` may pass ids already built (length -> ids) so repeated calls reuse the same tensors.

    `on_stage(name, result)` measures in stages and may stop early: first `screen` (the first call and
    one timed repeat at the first length: cheap, compile included), then `prefill_ctx<L>` per length (the
    full measurement; the first length's first-call and compile time come from the screen), then
    `decode`. It is called after each stage with that stage's result and returns False to stop: the
    report then holds what was measured so far. `on_phase(stage, detail)` hears of every call made.
    """
    t0 = time.perf_counter()
    prompts = dict(prompts or {})

    def ids_for(length: int | None) -> Any:
        if length not in prompts:
            prompts[length] = prompt_ids(model, length, source)
        return prompts[length]

    def report(pre: list[PrefillResult], dec: DecodeResult | None) -> BenchReport:
        return BenchReport(knobs=model.runtime.knobs() | {"compile": model.runtime.compile}, prefill=pre,
                           decode=dec, wall_s=time.perf_counter() - t0, prompt=source.describe())

    pre: list[PrefillResult] = []
    screen: PrefillResult | None = None
    if on_stage is not None and lengths:
        # one call, judged by the same load rule as every other figure (max_other_cpu, busy_retries)
        once = replace(settings, warmup=0, repeats=1, max_cv=1e9, max_rounds=1)
        screen = bench_prefill(model, ids_for(lengths[0]), once, model_info=model_info, on_phase=on_phase,
                               stage=f"screen at {lengths[0]} tokens")
        if not on_stage("screen", screen):
            return report([screen], None)
    for i, n in enumerate(lengths):
        result = bench_prefill(model, ids_for(n), settings, model_info=model_info, on_phase=on_phase)
        if i == 0 and screen is not None:  # the screen paid the first call (and any compilation)
            result.first_call_s = screen.first_call_s
            result.compile_s = max(0.0, screen.first_call_s - result.seconds.median)
        pre.append(result)
        if on_stage is not None and not on_stage(f"prefill_ctx{result.context_len}", result):
            return report(pre, None)
    dec = None
    if new_tokens:
        dlen = decode_context_len if decode_context_len is not None else (pre[0].context_len if pre else None)
        if batch_size == 1:
            dec_ids = ids_for(dlen)
        else:
            if (dlen, batch_size) not in prompts:
                prompts[(dlen, batch_size)] = prompt_ids(model, dlen, source, batch=batch_size)
            dec_ids = prompts[(dlen, batch_size)]
        dec = bench_decode(model, dec_ids, new_tokens, settings, record_steps=record_steps, on_phase=on_phase)
        if on_stage is not None:
            on_stage("decode", dec)
    return report(pre, dec)


# ---- reference cache --------------------------------------------------------------------------------
def save_reference(path: str | Path, logits: Any, tokens: Sequence[int], meta: dict[str, Any]) -> Path:
    """Store reference logits and tokens (torch.save of plain tensors; written to a temp file, then renamed)."""
    import os
    import tempfile

    import torch

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        torch.save({"logits": logits.detach().cpu(), "tokens": torch.tensor(list(tokens), dtype=torch.long),
                    "meta": {k: str(v) for k, v in meta.items()}}, tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def load_reference(path: str | Path, meta: dict[str, Any]) -> tuple[Any, list[int]] | None:
    """Reference logits and tokens saved by `save_reference`, or None if absent, unreadable or for other `meta`.

    Loaded with `weights_only=True`: a cache file can never execute code.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: recompute rather than fail the study
        return None
    if not isinstance(data, dict) or data.get("meta") != {k: str(v) for k, v in meta.items()}:
        return None
    return data["logits"], [int(t) for t in data["tokens"].tolist()]


# ---- memory guard and failure drills ----------------------------------------------------------------
def memory_guard(device: Any, config: Any = None) -> Any:
    """A MemoryWatchdog (context manager) for `device`, configured by XLSTM_MEM_* unless `config` is given.

    With no thresholds set it only records `peak_used_mb`; a hard threshold aborts the measurement with
    MemoryAbort in the calling thread.
    """
    from xlstm_tune.runtime.watchdog import MemoryWatchdog, WatchdogConfig

    return MemoryWatchdog(config if config is not None else WatchdogConfig.from_env(), device)


def provoke_failure(kind: str, device: Any, busy_work: Callable[[], None]) -> None:
    """Cause a real failure of `kind` in this process (the study's fault injection; see study.faults).

    compile_error: torch.compile with a backend that fails; oom: an allocation no allocator can serve;
    memory_abort: a memory watchdog with a 1 MB hard limit around `busy_work` (one model call) in a loop.
    """
    import torch

    if kind == "compile_error":
        def failing_backend(gm: Any, example_inputs: Any) -> Any:
            raise RuntimeError("injected compiler failure (XLSTM_TUNE_INJECT_FAULT)")

        torch.compile(lambda x: x * 2 + 1, backend=failing_backend)(torch.ones(4))
        raise RuntimeError("the injected compile error did not fire")
    if kind == "oom":
        torch.empty((2**42,), dtype=torch.float32, device=device)  # 16 TiB
        raise RuntimeError("the injected allocation did not fail")
    if kind == "memory_abort":
        from xlstm_tune.runtime.watchdog import WatchdogConfig

        deadline = time.monotonic() + 30
        with memory_guard(device, WatchdogConfig(hard_mb=1, poll_ms=5, actions=("warn",))):
            while time.monotonic() < deadline:
                busy_work()
        raise RuntimeError("the injected memory watchdog did not fire")
    raise ValueError(f"unknown failure drill {kind!r}")
