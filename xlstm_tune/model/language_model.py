"""LanguageModel: weights + tokenizer + the runtime that executes them (docs/DESIGN.md §4 Python API).

    logits, state = model(input_ids)              # prefill through the configured backend
    logits, state = model(next_ids, state)        # one token: the decode mode's step
    tokens, state = model.generate(input_ids, max_new_tokens=32)
    model.runtime = RuntimeOptions(...)           # new knobs, same weights
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from xlstm_tune.errors import UserError
from xlstm_tune.model.config import ModelConfig
from xlstm_tune.model.fused_decode import FusedDecodeStep, fused_decode_supported
from xlstm_tune.model.tokenizer import Tokenizer
from xlstm_tune.model.xlstm import ModelState, XLSTMForCausalLM
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.cells import CellRuntime
from xlstm_tune.runtime.decode import make_decode_step
from xlstm_tune.runtime.options import RuntimeOptions
from xlstm_tune.runtime.prefill_graph import DEFAULT_MAX_GRAPHS, PrefillGraphs
from xlstm_tune.runtime.prefill_segments import current_segment, piece_lengths, shape_bound
from xlstm_tune.runtime.state import clone_state
from xlstm_tune.runtime.tiles import RunStats

# on_step(step_index, seconds_since_previous_token) -- only called when timing is asked for.
StepCallback = Callable[[int, float], None]


class LanguageModel:
    def __init__(self, net: XLSTMForCausalLM, tokenizer: Tokenizer, device: torch.device, model_id: str,
                 runtime: RuntimeOptions | None = None):
        self.net = net.eval()
        self.net.fuse_projections()  # fewer, larger GEMMs; parameters stay loadable by name
        self.net.set_matvec(dev.matvec_fn(device))  # batch-1 decode GEMV where the device has one
        self.tokenizer = tokenizer
        self.device = device
        self.model_id = model_id
        self._cells: CellRuntime | None = None
        self._decode: Any = None
        self._prefill_graphs: PrefillGraphs | None = None
        # The built-in default bands 4 heads; a model with fewer heads gets one band of all of them.
        self.runtime = runtime or RuntimeOptions(heads_per_band=min(4, net.config.num_heads))

    # ---- configuration -----------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.net.config

    @property
    def dtype(self) -> torch.dtype:
        return self.net.lm_head.weight.dtype

    @property
    def runtime(self) -> RuntimeOptions:
        return self._options

    @runtime.setter
    def runtime(self, options: RuntimeOptions) -> None:
        """Re-configure the knobs; weights stay where they are. Pools/actors of the old options close."""
        if not isinstance(options, RuntimeOptions):
            raise UserError(f"model.runtime must be a RuntimeOptions, got {type(options).__name__}")
        cells = CellRuntime(options, self.device, self.config.num_heads)
        decode = make_decode_step(options.decode_mode, self.net.decode_step, self.device, options.compile,
                                  in_place_step=self._fused_step() if options.decode_mode == "graph" else None,
                                  stats=cells.stats)
        if self._cells is not None:
            self._cells.close()
        self._options, self._cells, self._decode = options, cells, decode
        self._prefill_graphs = None  # captured for the old cells: dropped with them

    def _fused_step(self) -> FusedDecodeStep | None:
        """The in-place step on fused kernels (batch 1..16), where the device has them and the model fits them."""
        kernels = dev.fused_decode_kernels(self.device)
        if kernels is None or fused_decode_supported(self.net) is not None:
            return None
        return FusedDecodeStep(self.net, kernels)

    @property
    def decode_path(self) -> str:
        """What one decode token runs: `eager`, `compiled`, `graph:fused` (the fused kernels, batch 1..16),
        `graph:step` (the captured step), or `graph` before the first capture."""
        mode = self._decode.mode
        if mode != "graph" or self._decode.graph is None:
            return mode
        return "graph:fused" if self._decode.fused else "graph:step"

    @property
    def stats(self) -> RunStats:
        """What ran since the last `stats.reset()`: kernel paths, tasks, compiled calls, chunk sizes."""
        return self._cells.stats  # type: ignore[union-attr]

    def close(self) -> None:
        self._prefill_graphs = None
        if self._cells is not None:
            self._cells.close()

    # ---- text --------------------------------------------------------------------------------
    def encode(self, text: str) -> Tensor:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise UserError("the prompt encodes to zero tokens: give a non-empty prompt")
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.flatten().tolist()
        return self.tokenizer.decode(list(ids))

    # ---- inference ---------------------------------------------------------------------------
    def _ids(self, input_ids: Any) -> Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise UserError(f"input_ids must be [batch, seq] with seq >= 1, got shape {tuple(ids.shape)}")
        # A fresh copy made under inference mode: compiled decode guards on the tensor kind, so every
        # token must arrive as the same kind (a few bytes, once per call).
        return ids.to(self.device, copy=True)

    @torch.inference_mode()
    def __call__(self, input_ids: Any, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        ids = self._ids(input_ids)
        if ids.shape[1] == 1 and state is not None:
            return self._decode(ids, state)
        return self._prefill(ids, state)

    def _prefill(self, ids: Tensor, state: ModelState | None) -> tuple[Tensor, ModelState]:
        """The prompt in the pieces `prefill_segment` asks for (runtime.prefill_segments; whole when it is
        0), each continuing the state the one before left; their logits written into one output."""
        segment = current_segment()
        pieces = piece_lengths(ids.shape[1], segment)
        slots = max(DEFAULT_MAX_GRAPHS, shape_bound(segment))  # a graph per piece shape, or prompts re-capture
        if len(pieces) == 1:
            self.stats.note(prefill_lengths=ids.shape[1])
            return self._prefill_piece(ids, state, slots)
        logits: Tensor | None = None
        start = 0
        for n in pieces:
            self.stats.note(prefill_lengths=n)
            part, state = self._prefill_piece(ids[:, start:start + n], state, slots)
            if logits is None:
                logits = part.new_empty(ids.shape[0], ids.shape[1], part.shape[-1])
            logits[:, start:start + n] = part
            start += n
        return logits, state  # type: ignore[return-value]

    def _prefill_piece(self, ids: Tensor, state: ModelState | None, slots: int) -> tuple[Tensor, ModelState]:
        """One piece through the backend; with the prefill_graph switch on (CUDA), the native backend's
        prefill is captured per prompt shape and replayed (`runtime.prefill_graph`), `slots` shapes kept.
        The other backends schedule from threads or actors, which a graph cannot hold: they always launch."""
        if dev.prefill_graphs_enabled(self.device) and self._options.backend == "native":
            if self._prefill_graphs is None:
                cells = self._cells
                self._prefill_graphs = PrefillGraphs(lambda i, s: self.net.forward_tokens(i, s, cells),
                                                     self.device, cells.stats)  # type: ignore[union-attr]
            self._prefill_graphs.max_graphs = slots
            return self._prefill_graphs(ids, state)
        self.stats.prefilled("call")
        return self.net.forward_tokens(ids, state, self._cells)

    @torch.inference_mode()
    def reference_forward(self, input_ids: Any, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """The canonical reference path: float32 step recurrence, eager, whatever the knobs say."""
        ids = self._ids(input_ids)
        canonical = CellRuntime(RuntimeOptions(backend="queued", chunk_size=1, t_inner=1, heads_per_band=self.config.num_heads,
                                               workers=1, compile=False), self.device, self.config.num_heads)
        try:
            return self.net.forward_tokens(ids, state, canonical)
        finally:
            canonical.close()

    @torch.inference_mode()
    def generate(self, input_ids: Any, max_new_tokens: int = 32, state: ModelState | None = None,
                 on_step: StepCallback | None = None) -> tuple[Tensor, ModelState]:
        """Greedy decoding. Returns the new tokens [B, max_new_tokens] and the final state.

        Tokens stay on the device (each step's greedy token fed straight back; in graph mode the captured
        graph writes it into its own input), so there is no host round trip per token unless `on_step`
        asks for per-step timing, which synchronises the device before each reading.
        """
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids = self._ids(input_ids)
        logits, state = self(ids, state)
        out = torch.empty(ids.shape[0], max_new_tokens, dtype=torch.long, device=self.device)
        if max_new_tokens == 0:
            return out, state
        token = logits[:, -1].argmax(-1, keepdim=True)
        out[:, 0:1] = token
        if on_step is not None:
            dev.synchronize(self.device)
        last = time.perf_counter()
        for n in range(1, max_new_tokens):
            token, state = self._decode.greedy(token, state)  # graph mode: the graph's own token buffer
            out[:, n : n + 1] = token
            if on_step is not None:
                dev.synchronize(self.device)
                now = time.perf_counter()
                on_step(n, now - last)
                last = now
        if self._decode.mode == "graph":  # detach the caller's state from the replayed buffers
            state = clone_state(state)
        return out, state
