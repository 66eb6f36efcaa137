"""Decode modes: how one token's step runs.

The runtime wraps any `step(token [B,1], state pytree) -> (logits [B,1,V], state)` function:
* eager: call it.
* compiled: torch.compile of the whole step (one graph of fused kernels per shape).
* graph: a device graph captured once over static token/state buffers and replayed per token; the state
  is updated in place inside the graph, so replay costs one launch and no host synchronisation. Where the
  model offers an in-place step on fused kernels (CUDA with Triton), that step is captured for the batch
  sizes it supports (1..16); otherwise, with the `compile` option on (default), the compiled step is.
  One graph (and one set of static buffers) per batch size: a batch of another size captures again.
  The graph also writes the greedy next token into its own token buffer, so greedy decoding
  (`greedy`) replays the graph once per token with nothing launched between replays but the copy of
  the token out.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from xlstm_tune.errors import DeviceUnavailableError
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.state import clone_state
from xlstm_tune.runtime.tiles import RunStats

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]


class InPlaceStepFn(Protocol):
    """(token [B, 1], state advanced in place) -> logits, for the batch sizes `supports` accepts;
    `argmax(logits, out)` writes each row's greedy next token into out [B, 1]."""

    def __call__(self, token: Tensor, state: Any) -> Tensor: ...

    def supports(self, batch: int) -> bool: ...

    def argmax(self, logits: Tensor, out: Tensor) -> Tensor: ...


def _flatten(state: Any) -> list[Tensor]:
    return [t for block in state for t in block]


def _greedy_token(logits: Tensor) -> Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)


class _Step:
    """What every mode offers: `step(token, state) -> (logits, state)` and `greedy`, the next token."""

    def __call__(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def greedy(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        """(each row's greedy next token [B, 1], state) after one step from `token`."""
        logits, state = self(token, state)
        return _greedy_token(logits), state


class EagerStep(_Step):
    mode = "eager"

    def __init__(self, step: StepFn, device: torch.device, stats: RunStats | None = None):
        self.step = step
        self.stats = stats or RunStats()

    def __call__(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        self.stats.decoded("eager")
        return self.step(token, state)


class CompiledStep(_Step):
    mode = "compiled"

    def __init__(self, step: StepFn, device: torch.device, stats: RunStats | None = None):
        if not dev.compile_available(device):
            raise DeviceUnavailableError(f"decode_mode=compiled needs torch.compile, which is not usable on {device}: use decode_mode=eager")
        self.step = torch.compile(step, dynamic=False)
        self.stats = stats or RunStats()

    def __call__(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        self.stats.decoded("compiled")
        return self.step(token, state)


class GraphStep(_Step):
    """Captured device graph over static buffers. `state` returned *is* the static buffer set, and the
    token `greedy` returns *is* the static token buffer (the next replay's input, overwritten by it)."""

    mode = "graph"

    def __init__(self, step: StepFn, device: torch.device, compile_step: bool = False,
                 in_place_step: InPlaceStepFn | None = None, stats: RunStats | None = None):
        if not dev.graphs_available(device):
            raise DeviceUnavailableError(
                f"decode_mode=graph needs device graphs (CUDA); {device.type} has none: use decode_mode=compiled or eager"
            )
        # Compiling first fuses the step's elementwise work; the graph then removes launch overhead.
        self.step = torch.compile(step, dynamic=False) if compile_step else step
        self.in_place_step = in_place_step
        self.device = device
        self.stats = stats or RunStats()
        self.fused = False  # whether the captured graph is the in-place fused step
        self.graph: Any = None
        self.static_token: Tensor | None = None
        self.static_state: Any = None
        self.static_logits: Tensor | None = None

    def _capture(self, token: Tensor, state: Any) -> None:
        self.static_token = token.clone()
        self.static_state = clone_state(state)
        self.fused = (self.in_place_step is not None and token.shape[1] == 1
                      and self.in_place_step.supports(int(token.shape[0])))
        # Warm up on a side stream (required before capture), then capture the step plus the in-place
        # state update, so a replay advances the state by itself.
        self.graph, self.static_logits = dev.capture_graph(self.device, self._step_in_place)

    def _step_in_place(self) -> Tensor:
        """The captured work: the step, the state written back, then the greedy next token written into
        the token buffer (read by the step's first kernel, so the next replay can start from it)."""
        if self.fused:
            logits = self.in_place_step(self.static_token, self.static_state)  # type: ignore[misc]
            self.in_place_step.argmax(logits, self.static_token)  # type: ignore[union-attr]
            return logits
        logits, new_state = self.step(self.static_token, self.static_state)
        for dst, src in zip(_flatten(self.static_state), _flatten(new_state)):
            dst.copy_(src)
        self.static_token.copy_(_greedy_token(logits))
        return logits

    def _replay(self, token: Tensor, state: Any) -> None:
        if self.graph is None or self.static_token.shape != token.shape or len(state) != len(self.static_state):
            self._capture(token, state)  # advanced the static copies during warm-up: reloaded just below
        if state is not self.static_state:
            for dst, src in zip(_flatten(self.static_state), _flatten(state)):
                dst.copy_(src)
        if token is not self.static_token:  # greedy decoding hands back the buffer the last replay wrote
            self.static_token.copy_(token)
        self.graph.replay()
        self.stats.decoded("graph:fused" if self.fused else "graph:step")

    def __call__(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        self._replay(token, state)
        return self.static_logits, self.static_state

    def greedy(self, token: Tensor, state: Any) -> tuple[Tensor, Any]:
        self._replay(token, state)
        return self.static_token, self.static_state


def make_decode_step(mode: str, step: StepFn, device: torch.device, compile_step: bool = True,
                     in_place_step: InPlaceStepFn | None = None, stats: RunStats | None = None) -> Any:
    """`compile_step` (the `compile` option) also compiles the step that `graph` captures;
    `in_place_step`, if given, is what `graph` captures for the batch sizes it supports. Each step run is
    counted in `stats.decode_paths`."""
    if mode == "eager":
        return EagerStep(step, device, stats)
    if mode == "compiled":
        return CompiledStep(step, device, stats)
    if mode == "graph":
        return GraphStep(step, device, compile_step=compile_step and dev.compile_available(device), in_place_step=in_place_step,
                         stats=stats)
    raise ValueError(mode)


def available_decode_modes(device: torch.device) -> list[str]:
    """The modes this device can run (the study's search space uses this)."""
    modes = ["eager"]
    if dev.compile_available(device):
        modes.append("compiled")
    if dev.graphs_available(device):
        modes.append("graph")
    return modes
