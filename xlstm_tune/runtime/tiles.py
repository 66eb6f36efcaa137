"""Tile kernels: what one scheduler task computes for one head band.

* step tile: one task = one chunk of one head band, advanced by `chunk_size / t_inner` calls of the
  (compiled) step-block, each covering `t_inner` steps (the ragged last chunk gets shorter blocks).
* chunkwise tile: the chunkwise-parallel form over the band with the given chunk size.

Schedulers (inline, queued, ray) decide where and how concurrently the chunks of different bands run;
the chunks of one band always run in time order, each from the state the previous one left. They never
touch the math.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from xlstm_tune.kernels.mlstm import State, mlstm_chunkwise, mlstm_step_block
from xlstm_tune.kernels.slstm import SState, slstm_step_block
from xlstm_tune.runtime import watchdog
from xlstm_tune.runtime.device import tf32_cell_products, uses_tf32_cell_products

_COMPILED: dict[str, "CompiledKernel"] = {}
_COMPILE_LOCK = threading.Lock()


def _signature(value: Any) -> Any:
    """What a compiled kernel specialises on: tensor shape/stride/dtype/device, and plain values."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.stride(), value.dtype, value.device, value.is_inference())
    if isinstance(value, (tuple, list)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _signature(v)) for k, v in value.items()))
    return value if isinstance(value, (int, float, str, bool, type(None))) else id(value)


class CompileGate:
    """Process-wide: compiles run one at a time and alone; warm calls run concurrently between them.

    Dynamo's FX-tracing flag is global to the process, so a warm call that starts while another thread is
    tracing takes itself for a nested trace and raises (seen on CUDA with the queued backend's workers).
    A waiting compile goes first: new warm calls queue behind it, so busy workers cannot starve it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._compiling = False
        self._compiles_waiting = 0
        self._warm_waiting = 0

    def _snapshot(self) -> dict[str, int]:
        return {"running": self._running, "compiling": int(self._compiling),
                "compiles_waiting": self._compiles_waiting, "warm_waiting": self._warm_waiting}

    def state(self) -> dict[str, int]:
        """Calls inside and queued at the gate: running, compiling (0/1), compiles_waiting, warm_waiting."""
        with self._cond:
            return self._snapshot()

    def wait_until(self, predicate: Callable[[dict[str, int]], bool], timeout: float) -> bool:
        """Block until `predicate(state())` holds (True) or `timeout` seconds pass (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot()), timeout)

    @contextlib.contextmanager
    def warm_call(self) -> Iterator[None]:
        with self._cond:
            self._warm_waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._compiling and not self._compiles_waiting)
            self._warm_waiting -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        with self._cond:
            self._compiles_waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._compiling and self._running == 0)
            self._compiles_waiting -= 1
            self._compiling = True
        try:
            yield
        finally:
            with self._cond:
                self._compiling = False
                self._cond.notify_all()


_GATE = CompileGate()


class CompiledKernel:
    """torch.compile of one kernel, safe to call from many scheduler threads.

    The first call for each new signature compiles, alone in the process (`CompileGate`); once a signature
    is warm, calls run concurrently.
    """

    def __init__(self, fn: Callable[..., Any], gate: CompileGate = _GATE):
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True  # never fall back to eager silently
        self.fn = torch.compile(fn, dynamic=False)
        self.warm: set = set()
        self.gate = gate
        self.calls = 0  # calls made through the compiled function: what ran, for tests and benchmarks
        self._calls_lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._calls_lock:
            self.calls += 1
        key = _signature((args, kwargs))
        if key in self.warm:
            with self.gate.warm_call():
                return self.fn(*args, **kwargs)
        with self.gate.compiling():
            out = self.fn(*args, **kwargs)
            self.warm.add(key)
        return out


def compiled(name: str, fn: Callable[..., Any]) -> CompiledKernel:
    """One compiled wrapper per kernel per process, shared by every model, band and thread.

    Recompiles happen per new static shape (band width, t_inner, batch); the limit is raised so that
    a study's many shapes never silently fall back to eager execution.
    """
    with _COMPILE_LOCK:
        if name not in _COMPILED:
            _COMPILED[name] = CompiledKernel(fn)
        return _COMPILED[name]


@dataclass
class RunStats:
    """What actually ran, counted where it happens: lets a benchmark prove that a knob took effect.

    Counters are incremented by the code that does the work (a tile when it runs a kernel or finishes a
    chunk, a scheduler when it dispatches a task or makes a remote call), never copied from the options.
    """

    kernel_paths: Counter = field(default_factory=Counter)  # e.g. "mlstm.step_block.compiled": calls made
    tasks_dispatched: int = 0  # scheduler tasks handed out (one chunk of one band; native mLSTM: one band)
    compiled_calls: int = 0
    eager_calls: int = 0
    tokens_prefilled: int = 0  # tokens through the mLSTM cells, summed over layers
    chunks_run: int = 0  # chunks finished by the tiles, summed over bands and layers
    chunk_lengths: set = field(default_factory=set)  # lengths (steps) of the chunks that ran
    step_block_lengths: set = field(default_factory=set)  # lengths (steps) of the step-block calls made
    band_widths: set = field(default_factory=set)  # heads per task that ran
    cell_products: set = field(default_factory=set)  # "tf32" or "ieee": how the chunkwise cell's products ran
    peak_in_flight: int = 0  # most tasks the queued dispatcher had submitted and not yet collected
    stream_tasks: int = 0  # tasks issued on a side device stream (queued with streams > 0)
    ray_remote_calls: int = 0  # actor method calls the Ray scheduler made
    decode_paths: Counter = field(default_factory=Counter)  # one-token decode steps run, by decode path
    prefill_paths: Counter = field(default_factory=Counter)  # prefills run: "call", "graph:capture", "graph:replay"
    prefill_lengths: set = field(default_factory=set)  # lengths of the prefill calls (pieces) made
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    _COUNTS = ("tasks_dispatched", "compiled_calls", "eager_calls", "tokens_prefilled", "chunks_run",
               "stream_tasks", "ray_remote_calls")
    _SETS = ("chunk_lengths", "step_block_lengths", "band_widths", "cell_products", "prefill_lengths")

    def add(self, path: str, calls: int = 1, *, is_compiled: bool) -> None:
        """`calls` kernel calls made on `path`."""
        with self._lock:
            self.kernel_paths[path] += calls
            if is_compiled:
                self.compiled_calls += calls
            else:
                self.eager_calls += calls

    def decoded(self, path: str) -> None:
        """One decode step ran on `path` (eager, compiled, graph:fused, graph:step)."""
        with self._lock:
            self.decode_paths[path] += 1

    def prefilled(self, path: str) -> None:
        """One prefill ran on `path`: `call` (its kernels launched from the host), or a device graph's
        `graph:capture` (the first prefill of a shape) and `graph:replay`."""
        with self._lock:
            self.prefill_paths[path] += 1

    def count(self, **increments: int) -> None:
        """Add to integer counters, e.g. count(chunks_run=1)."""
        with self._lock:
            for key, value in increments.items():
                if key not in self._COUNTS:
                    raise KeyError(key)
                setattr(self, key, getattr(self, key) + value)

    def note(self, **values: Any) -> None:
        """Record a value seen into a set field, e.g. note(band_widths=3)."""
        with self._lock:
            for key, value in values.items():
                if key not in self._SETS:
                    raise KeyError(key)
                getattr(self, key).add(value)

    def peak(self, in_flight: int) -> None:
        with self._lock:
            self.peak_in_flight = max(self.peak_in_flight, in_flight)

    def merge(self, other: dict[str, Any]) -> None:
        """Add another RunStats' `as_dict()` (e.g. counted inside a Ray actor) into this one."""
        with self._lock:
            self.kernel_paths.update(other["kernel_paths"])
            self.decode_paths.update(other["decode_paths"])
            self.prefill_paths.update(other.get("prefill_paths") or {})
            for key in self._COUNTS:
                setattr(self, key, getattr(self, key) + other[key])
            for key in self._SETS:
                getattr(self, key).update(other.get(key) or ())
            self.peak_in_flight = max(self.peak_in_flight, other["peak_in_flight"])

    def counted_apart(self, run: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
        """(`run()`, what it counted, as `as_dict()`), the counts kept apart from the earlier ones while it
        ran (a set such as `chunk_lengths` then holds only what `run` saw); afterwards this holds both."""
        saved = self.as_dict()
        self.reset()
        try:
            result = run()
        finally:
            counted = self.as_dict()
            self.reset()
            self.merge(saved)
            self.merge(counted)
        return result, counted

    def reset(self) -> None:
        with self._lock:
            self.kernel_paths.clear()
            self.decode_paths.clear()
            self.prefill_paths.clear()
            for key in self._COUNTS:
                setattr(self, key, 0)
            for key in self._SETS:
                getattr(self, key).clear()
            self.peak_in_flight = 0

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"kernel_paths": dict(self.kernel_paths)}
            out.update({key: getattr(self, key) for key in self._COUNTS})
            out.update({key: sorted(getattr(self, key)) for key in self._SETS})
            out["peak_in_flight"] = self.peak_in_flight
            out["decode_paths"] = dict(self.decode_paths)
            out["prefill_paths"] = dict(self.prefill_paths)
            return out


@dataclass(frozen=True)
class TileConfig:
    chunk_size: int
    t_inner: int
    compile: bool


def spans(length: int, size: int) -> list[tuple[int, int]]:
    """(start, length) pieces of `size` covering 0..length in order; the last one may be shorter."""
    return [(t0, min(size, length - t0)) for t0 in range(0, length, size)]


def _step_blocks(name: str, cfg: TileConfig, stats: RunStats, steps: int,
                 block: Callable[[int, int, Any], tuple[Tensor, Any]], state: Any) -> tuple[list[Tensor], Any]:
    """Advance one chunk of `steps` steps by step-block calls of `cfg.t_inner` steps (the last may be
    shorter), in time order. `block(t0, n, state)` makes one call."""
    outs = []
    for t0, n in spans(steps, cfg.t_inner):
        out, state = block(t0, n, state)
        outs.append(out)
        stats.note(step_block_lengths=n)
    stats.add(f"{name}.step_block." + ("compiled" if cfg.compile else "eager"), len(outs), is_compiled=cfg.compile)
    stats.count(chunks_run=1)
    stats.note(chunk_lengths=steps)
    return outs, state


def mlstm_step_chunk(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State,
                     cfg: TileConfig, stats: RunStats) -> tuple[Tensor, State]:
    """One chunk of one band (time dim 2) by step-blocks; returns h [B, Hb, chunk, V] and the new state."""
    watchdog.checkpoint()  # chunk boundary: a hard memory abort stops here at the latest
    fn = compiled("mlstm_step_block", mlstm_step_block) if cfg.compile else mlstm_step_block
    stats.note(band_widths=q.shape[1])

    def block(t0: int, n: int, st: State) -> tuple[Tensor, State]:
        sl = slice(t0, t0 + n)
        return fn(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], st)

    hs, state = _step_blocks("mlstm", cfg, stats, q.shape[2], block, state)
    return (hs[0] if len(hs) == 1 else torch.cat(hs, dim=2)), state


def slstm_step_chunk(wx: Tensor, r: Tensor, b: Tensor, state: SState, cfg: TileConfig, stats: RunStats) -> tuple[Tensor, SState]:
    """One chunk of one band, sLSTM (no parallel form). wx: [B, chunk, 4, Hb, D]; returns y [B, chunk, Hb, D]."""
    watchdog.checkpoint()
    fn = compiled("slstm_step_block", slstm_step_block) if cfg.compile else slstm_step_block
    stats.note(band_widths=wx.shape[3])
    ys, state = _step_blocks("slstm", cfg, stats, wx.shape[1],
                             lambda t0, n, st: fn(wx[:, t0:t0 + n], r, b, st), state)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)), state


def mlstm_chunk_tile(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State,
                     cfg: TileConfig, stats: RunStats) -> tuple[Tensor, State]:
    """Chunkwise-parallel tile: one call over the band (compiled where asked); the kernel runs the full
    chunks of `chunk_size` in one batched pass and the tail as one shorter chunk."""
    watchdog.checkpoint()
    fn = compiled("mlstm_chunkwise", mlstm_chunkwise) if cfg.compile else mlstm_chunkwise
    tf32 = uses_tf32_cell_products(q)
    with tf32_cell_products(tf32):
        h, state = fn(q, k, v, i, f, state, chunk_size=cfg.chunk_size)
    chunks = spans(q.shape[2], cfg.chunk_size)
    stats.note(cell_products="tf32" if tf32 else "ieee", band_widths=q.shape[1])
    for _, n in chunks:
        stats.note(chunk_lengths=n)
    stats.count(chunks_run=len(chunks))
    stats.add("mlstm.chunkwise." + ("compiled" if cfg.compile else "eager"), 1, is_compiled=cfg.compile)
    return h, state


# A step tile per cell kind: the function that runs one chunk of one band, and the inputs' time dim.
STEP_TILES: dict[str, tuple[Callable[..., Any], int]] = {
    "mlstm": (mlstm_step_chunk, 2),
    "slstm": (slstm_step_chunk, 1),
}


@dataclass
class BandWork:
    """One head band's prefill: per-time inputs (sliced chunk by chunk), constant inputs, the state.

    `state` is the band's running float32 state; it is replaced after each chunk, so chunk c+1 of the
    band always starts from the state chunk c left.
    """

    seq: tuple[Tensor, ...]
    const: tuple[Tensor, ...]
    state: tuple[Tensor, ...]
    outs: list[Tensor] = field(default_factory=list)


def chunk_inputs(kind: str, work: BandWork, span: tuple[int, int]) -> tuple[Tensor, ...]:
    """The per-time inputs of one chunk (views into the band's inputs)."""
    _, dim = STEP_TILES[kind]
    t0, n = span
    return tuple(x.narrow(dim, t0, n) for x in work.seq)


def run_chunk(kind: str, seq: tuple[Tensor, ...], const: tuple[Tensor, ...], state: tuple[Tensor, ...],
              cfg: TileConfig, stats: RunStats) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One task: one chunk of one band through its step tile."""
    fn, _ = STEP_TILES[kind]
    return fn(*seq, *const, state, cfg, stats)
