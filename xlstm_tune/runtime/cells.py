"""CellRuntime: runs mLSTM / sLSTM cells for prefill through the configured scheduler × tile kernel.

backend  -> scheduler × tile (DESIGN.md §2)
native   -> inline × chunkwise-parallel over all heads   (chunkwise--native_compiled_autograd)
queued   -> thread pool × step-block per head band       (chunkwise--queued_compiled_steps)
ray      -> Ray actors × step-block per head band        (chunkwise--ray_compiled_steps)

sLSTM has no parallel form, so under `native` it runs the step-block tile inline over all heads.
The runtime lives as long as the model and its options: pools and actors are created once.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import Tensor

from xlstm_tune.kernels.mlstm import State
from xlstm_tune.kernels.slstm import SState
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.options import RuntimeOptions
from xlstm_tune.runtime.tiles import RunStats, TileConfig, mlstm_chunk_tile, mlstm_step_tile, slstm_step_tile

TILE_FNS: dict[str, Callable[..., Any]] = {
    "mlstm_step": mlstm_step_tile,
    "mlstm_chunk": mlstm_chunk_tile,
    "slstm_step": slstm_step_tile,
}


def head_bands(num_heads: int, heads_per_band: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering all heads; the last band is ragged when heads_per_band does not divide."""
    return [(h0, min(h0 + heads_per_band, num_heads)) for h0 in range(0, num_heads, heads_per_band)]


class InlineScheduler:
    """Runs band tasks one after another in the calling thread."""

    name = "inline"

    def map(self, kind: str, tasks: list[tuple], cfg: TileConfig, stats: RunStats) -> list[Any]:
        fn = TILE_FNS[kind]
        stats.note(tasks=len(tasks))
        return [fn(*args, cfg, stats) for args in tasks]

    def close(self) -> None:
        pass


class QueuedScheduler:
    """A pool of `workers` coordinator threads; each task is one head band walking its chunks in order.

    Torch kernels release the GIL, so bands overlap on the device; with `streams` > 0 each task is
    issued on one of that many device streams, and the caller's stream waits for all of them.
    """

    name = "queued"

    def __init__(self, workers: int, streams: int, device: torch.device):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xlstm-queued")
        self.device = device
        self.streams = [dev.new_stream(device) for _ in range(streams)] if streams else []

    def _run(self, fn: Callable[..., Any], args: tuple, cfg: TileConfig, stats: RunStats, slot: int) -> Any:
        stream = self.streams[slot % len(self.streams)] if self.streams else None
        # Grad mode is thread-local: worker threads must enter inference mode themselves.
        with torch.inference_mode(), dev.stream_context(stream):
            return fn(*args, cfg, stats)

    def map(self, kind: str, tasks: list[tuple], cfg: TileConfig, stats: RunStats) -> list[Any]:
        fn = TILE_FNS[kind]
        stats.note(tasks=len(tasks))
        if self.streams:
            dev.wait_for_current(self.device, self.streams)  # inputs were produced on the current stream
        futures = [self.pool.submit(self._run, fn, args, cfg, stats, n) for n, args in enumerate(tasks)]
        results = [fut.result() for fut in futures]
        if self.streams:
            dev.join_streams(self.device, self.streams)
        return results

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def make_scheduler(options: RuntimeOptions, device: torch.device) -> Any:
    if options.streams and options.backend != "queued":
        from xlstm_tune.errors import UserError

        raise UserError(f"streams={options.streams} only applies to the queued backend; set streams=0 for {options.backend}")
    if options.streams and not dev.streams_available(device):
        from xlstm_tune.errors import DeviceUnavailableError

        raise DeviceUnavailableError(
            f"streams={options.streams} asked for, but {device.type} has no device streams in this torch build: use streams=0"
        )
    if options.backend == "queued":
        return QueuedScheduler(options.workers, options.streams, device)
    if options.backend == "ray":
        from xlstm_tune.runtime.ray_scheduler import RayScheduler

        return RayScheduler(options, device)
    return InlineScheduler()


class CellRuntime:
    """The prefill executor a model's layers call. Built from RuntimeOptions; records what ran."""

    def __init__(self, options: RuntimeOptions, device: torch.device, num_heads: int):
        options.check_for_model(num_heads)
        self.options = options
        self.device = device
        self.stats = RunStats()
        self.tile = TileConfig(options.chunk_size, options.t_inner, options.compile)
        self.scheduler = make_scheduler(options, device)

    def _bands(self, num_heads: int) -> list[tuple[int, int]]:
        if self.options.backend == "native":
            return [(0, num_heads)]
        return head_bands(num_heads, min(self.options.heads_per_band, num_heads))

    def mlstm(self, q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State) -> tuple[Tensor, State]:
        """q, k: [B,H,S,K]; v: [B,H,S,V]; i, f: [B,H,S]; state float32. Returns h float32 [B,H,S,V]."""
        kind = "mlstm_chunk" if self.options.backend == "native" else "mlstm_step"
        if kind == "mlstm_chunk":
            # One band of all heads, run inline: the kernel reads the projection's strided views as they
            # are (copying them cost ~5% of a 7B prefill).
            tasks = [(q, k, v, i, f, state)]
            self.stats.note(band_widths=q.shape[1])
        else:
            tasks = []
            for h0, h1 in self._bands(q.shape[1]):
                sl = slice(h0, h1)  # bands travel to other threads/processes: own, contiguous memory
                tasks.append((
                    q[:, sl].contiguous(), k[:, sl].contiguous(), v[:, sl].contiguous(),
                    i[:, sl].contiguous(), f[:, sl].contiguous(),
                    tuple(s[:, sl].contiguous() for s in state),
                ))
                self.stats.note(band_widths=h1 - h0)
        self.stats.note(chunk_sizes=self.options.chunk_size, tokens=q.shape[2])
        if kind == "mlstm_step":
            self.stats.note(t_inner=self.options.t_inner)
        results = self.scheduler.map(kind, tasks, self.tile, self.stats)
        if len(results) == 1:
            return results[0]
        h = torch.cat([r[0] for r in results], dim=1)
        new_state = tuple(torch.cat([r[1][j] for r in results], dim=1) for j in range(3))
        return h, new_state  # type: ignore[return-value]

    def slstm(self, wx: Tensor, r: Tensor, b: Tensor, state: SState) -> tuple[Tensor, SState]:
        """wx: [B,S,4,H,D]; r: [H,D,4,D]; b: [H,4,D]; state (y,c,n,m) [B,H,D]. Returns y [B,S,H,D]."""
        bands = self._bands(wx.shape[3]) if self.options.backend != "native" else [(0, wx.shape[3])]
        tasks = []
        for h0, h1 in bands:
            sl = slice(h0, h1)
            tasks.append((wx[:, :, :, sl].contiguous(), r[sl].contiguous(), b[sl].contiguous(),
                          tuple(s[:, sl].contiguous() for s in state)))
        self.stats.note(t_inner=self.options.t_inner, chunk_sizes=self.options.chunk_size)
        results = self.scheduler.map("slstm_step", tasks, self.tile, self.stats)
        if len(results) == 1:
            return results[0]
        y = torch.cat([res[0] for res in results], dim=2)
        new_state = tuple(torch.cat([res[1][j] for res in results], dim=1) for j in range(4))
        return y, new_state  # type: ignore[return-value]

    def close(self) -> None:
        self.scheduler.close()
