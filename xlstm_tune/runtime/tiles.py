"""Tile kernels: what one scheduler task computes for one head band.

* step-block tile: walk the band's chunks in strict time order; each chunk is advanced by
  `chunk_size / t_inner` calls of the (compiled) step-block, each covering `t_inner` steps.
* chunkwise tile: the chunkwise-parallel form over the band with the given chunk size.

Schedulers (inline, queued, ray) decide where and how concurrently bands run; they never touch the math.
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

    @contextlib.contextmanager
    def warm_call(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._compiling and not self._compiles_waiting)
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

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
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
    """What actually ran: lets a benchmark prove that a knob took effect."""

    kernel_paths: Counter = field(default_factory=Counter)  # e.g. "mlstm.step_block.compiled": calls
    tasks_dispatched: int = 0
    compiled_calls: int = 0
    eager_calls: int = 0
    chunk_sizes: set = field(default_factory=set)
    cell_products: set = field(default_factory=set)  # "tf32" or "ieee": how the chunkwise cell's products ran
    band_widths: set = field(default_factory=set)
    t_inner: set = field(default_factory=set)
    tokens_prefilled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, path: str, calls: int = 1, *, is_compiled: bool) -> None:
        with self._lock:
            self.kernel_paths[path] += calls
            if is_compiled:
                self.compiled_calls += calls
            else:
                self.eager_calls += calls

    def note(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                if key == "tasks":
                    self.tasks_dispatched += value
                elif key == "tokens":
                    self.tokens_prefilled += value
                else:
                    getattr(self, key).add(value)

    def reset(self) -> None:
        with self._lock:
            self.kernel_paths.clear()
            self.tasks_dispatched = self.compiled_calls = self.eager_calls = self.tokens_prefilled = 0
            self.chunk_sizes.clear()
            self.cell_products.clear()
            self.band_widths.clear()
            self.t_inner.clear()

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "kernel_paths": dict(self.kernel_paths),
                "tasks_dispatched": self.tasks_dispatched,
                "compiled_calls": self.compiled_calls,
                "eager_calls": self.eager_calls,
                "chunk_sizes": sorted(self.chunk_sizes),
                "cell_products": sorted(self.cell_products),
                "band_widths": sorted(self.band_widths),
                "t_inner": sorted(self.t_inner),
                "tokens_prefilled": self.tokens_prefilled,
            }


@dataclass(frozen=True)
class TileConfig:
    chunk_size: int
    t_inner: int
    compile: bool


def _blocks(seq_len: int, chunk_size: int, t_inner: int) -> list[tuple[int, int]]:
    """(start, length) of step-blocks covering the sequence chunk by chunk, in time order.

    Every full block has `t_inner` steps (one compiled shape); a chunk's remainder (only in the last,
    partial chunk) becomes one shorter block.
    """
    out = []
    for c0 in range(0, seq_len, chunk_size):
        c1 = min(c0 + chunk_size, seq_len)
        for b0 in range(c0, c1, t_inner):
            out.append((b0, min(b0 + t_inner, c1) - b0))
    return out


def mlstm_step_tile(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State,
                    cfg: TileConfig, stats: RunStats) -> tuple[Tensor, State]:
    """Step-block tile for one band: strict time order, chunk by chunk."""
    fn = compiled("mlstm_step_block", mlstm_step_block) if cfg.compile else mlstm_step_block
    path = "mlstm.step_block." + ("compiled" if cfg.compile else "eager")
    hs = []
    blocks = _blocks(q.shape[2], cfg.chunk_size, cfg.t_inner)
    for n, (t0, length) in enumerate(blocks):
        if n % max(1, cfg.chunk_size // cfg.t_inner) == 0:
            watchdog.checkpoint()  # chunk boundary: a hard memory abort stops here at the latest
        sl = slice(t0, t0 + length)
        h, state = fn(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], state)
        hs.append(h)
    stats.add(path, len(blocks), is_compiled=cfg.compile)
    return torch.cat(hs, dim=2), state


def mlstm_chunk_tile(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State,
                     cfg: TileConfig, stats: RunStats) -> tuple[Tensor, State]:
    """Chunkwise-parallel tile: one call over the band (compiled where asked)."""
    watchdog.checkpoint()
    fn = compiled("mlstm_chunkwise", mlstm_chunkwise) if cfg.compile else mlstm_chunkwise
    tf32 = uses_tf32_cell_products(q)
    with tf32_cell_products(tf32):
        h, state = fn(q, k, v, i, f, state, chunk_size=cfg.chunk_size)
    stats.note(cell_products="tf32" if tf32 else "ieee")
    stats.add("mlstm.chunkwise." + ("compiled" if cfg.compile else "eager"), 1, is_compiled=cfg.compile)
    return h, state


def slstm_step_tile(wx: Tensor, r: Tensor, b: Tensor, state: SState, cfg: TileConfig, stats: RunStats) -> tuple[Tensor, SState]:
    """sLSTM has no parallel form: step-blocks in strict time order. wx: [B, S, 4, Hb, D]."""
    fn = compiled("slstm_step_block", slstm_step_block) if cfg.compile else slstm_step_block
    ys = []
    blocks = _blocks(wx.shape[1], cfg.chunk_size, cfg.t_inner)
    for n, (t0, length) in enumerate(blocks):
        if n % max(1, cfg.chunk_size // cfg.t_inner) == 0:
            watchdog.checkpoint()
        y, state = fn(wx[:, t0:t0 + length], r, b, state)
        ys.append(y)
    stats.add("slstm.step_block." + ("compiled" if cfg.compile else "eager"), len(blocks), is_compiled=cfg.compile)
    return torch.cat(ys, dim=1), state
