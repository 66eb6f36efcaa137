"""Prefill replayed from device graphs: one capture per prompt shape, then one launch per prefill.

A native prefill launches a few dozen kernels per block from Python. For a small model the host cannot
launch them as fast as the GPU runs them: on an H200 the 350M prefill took about as long at 2,048 tokens
as at 8,192 (docs/PERFORMANCE.md), the time of the launches, not of the work. A captured graph replays
the same kernels on the same buffers with one launch, so the host drops out.

`PrefillGraphs(forward, device, stats)` wraps `forward(ids, state) -> (logits, state)`:

* one graph per (batch, length, whether a state is given, the kernel switches in force): the first
  prefill of a shape runs `forward` once for real on a side stream (compiling and autotuning there, as
  capture requires), then captures it; every later prefill of that shape copies its ids (and state) into
  the graph's input buffers and replays;
* what a caller gets back is a copy: the graph's output buffers are overwritten by its next replay, and a
  caller's logits must not change under it;
* every graph draws on one memory pool (replays never overlap and their outputs are copied at once, so
  they can share it), and at most `max_graphs` are kept (least recently used dropped first);
* `stats` counts what ran: the kernels of the captured forward once per replay (as the forward itself
  would), and `prefill_paths["graph:capture"]` / `["graph:replay"]`.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xlstm_tune.errors import DeviceUnavailableError
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.settings import SETTING_ENV_VARS
from xlstm_tune.runtime.state import clone_state
from xlstm_tune.runtime.tiles import RunStats

ForwardFn = Callable[[Tensor, Any], tuple[Tensor, Any]]

# The switches read at call time that choose kernels inside a prefill: a graph captured under one set
# must not be replayed under another.
_KERNEL_SWITCHES = (SETTING_ENV_VARS["tf32_cell"], SETTING_ENV_VARS["triton_gemv"])
DEFAULT_MAX_GRAPHS = 4


def _one_pass(two_passes: dict[str, Any]) -> dict[str, Any]:
    """One forward's counts, in `RunStats.merge` form, from what a capture counted (`counted_apart`): it
    ran the forward twice (the warm-up for real, then the recording), each counted alike."""
    out = dict(two_passes)
    for key in ("kernel_paths", "decode_paths"):
        out[key] = {k: v // 2 for k, v in two_passes[key].items()}
    for key in RunStats._COUNTS:
        out[key] = two_passes[key] // 2
    out["prefill_paths"] = {}
    return out


@dataclass
class _Captured:
    graph: Any
    ids: Tensor
    state: list[tuple[Tensor, ...]] | None  # input buffers of a continued prefill; None: starts empty
    logits: Tensor
    new_state: Any
    counted: dict[str, Any]  # the stats one run of the captured forward adds


class PrefillGraphs:
    """`forward` captured per prompt shape and replayed (see the module docstring); CUDA only."""

    def __init__(self, forward: ForwardFn, device: torch.device, stats: RunStats,
                 max_graphs: int = DEFAULT_MAX_GRAPHS):
        self.forward = forward
        self.device = device
        self.stats = stats
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    def _key(self, ids: Tensor, state: Any) -> tuple:
        switches = tuple(os.environ.get(name, "") for name in _KERNEL_SWITCHES)
        return (tuple(ids.shape), state is not None, switches)

    def _capture(self, ids: Tensor, state: Any) -> _Captured:
        static_ids = ids.clone()
        static_state = None if state is None else clone_state(state)
        if self._pool is None:
            self._pool = dev.graph_memory_pool(self.device)
        # The warm-up on a side stream is a real prefill (it compiles and autotunes, which capture
        # cannot); the recording counts its kernels as well, and so stands for the replay that follows.
        # Counted apart, so that a replay adds this shape's chunk lengths, not every shape's so far.
        try:
            (graph, (logits, new_state)), two_passes = self.stats.counted_apart(lambda: dev.capture_graph(
                self.device, lambda: self.forward(static_ids, static_state), warmup=1, pool=self._pool,
                capture_error_mode="thread_local"))  # the memory watchdog polls from its own thread
        except RuntimeError as exc:  # something in the prefill cannot be captured (a host sync, an unsafe call)
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DeviceUnavailableError(
                f"prefill_graph: capturing the prefill of shape {tuple(ids.shape)} failed ({cause}); "
                "set prefill_graph = false (XLSTM_PREFILL_GRAPH=0) to launch it instead") from exc
        counted = _one_pass(two_passes)
        self.stats.prefilled("graph:capture")
        return _Captured(graph, static_ids, static_state, logits, new_state, counted)

    def __call__(self, ids: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        key = self._key(ids, state)
        captured = self._graphs.get(key)
        fresh = captured is None
        if fresh:
            captured = self._capture(ids, state)
            self._graphs[key] = captured
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        captured.ids.copy_(ids)
        if captured.state is not None:
            for dst_block, src_block in zip(captured.state, state):
                for dst, src in zip(dst_block, src_block):
                    dst.copy_(src)
        captured.graph.replay()
        if not fresh:  # the capture already counted the first replay's kernels
            self.stats.merge(captured.counted)
        self.stats.prefilled("graph:replay")
        return captured.logits.clone(), clone_state(captured.new_state)

