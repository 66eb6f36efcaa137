"""CellRuntime: runs mLSTM / sLSTM cells for prefill through the configured scheduler × tile kernel.

backend  -> scheduler × tile (docs/DESIGN.md §2)
native   -> inline × chunkwise-parallel over all heads   (chunkwise--native_compiled_autograd)
queued   -> thread pool × step tile per head band        (chunkwise--queued_compiled_steps)
ray      -> Ray actors × step tile per head band         (chunkwise--ray_compiled_steps)

For the step-tile backends a task is one chunk of one head band: `chunk_size` is the dispatch
granularity, `t_inner` the steps per (compiled) step-block call inside a chunk. The chunks of a band run
in strict time order, each from the float32 state the previous one left; different bands run
concurrently. sLSTM has no parallel form, so under `native` it runs the step tile inline over all heads,
chunk by chunk. The runtime lives as long as the model and its options: pools and actors are created once.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from torch import Tensor

from xlstm_tune.kernels.mlstm import State
from xlstm_tune.kernels.slstm import SState
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.options import RuntimeOptions
from xlstm_tune.runtime.tiles import (BandWork, RunStats, TileConfig, chunk_inputs, mlstm_chunk_tile, run_chunk,
                                      spans)


def head_bands(num_heads: int, heads_per_band: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering all heads; the last band is ragged when heads_per_band does not divide."""
    return [(h0, min(h0 + heads_per_band, num_heads)) for h0 in range(0, num_heads, heads_per_band)]


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class InlineScheduler:
    """Runs the chunk tasks in the calling thread, band after band, each band's chunks in time order."""

    name = "inline"

    def run_bands(self, kind: str, bands: list[BandWork], chunks: list[tuple[int, int]], cfg: TileConfig,
                  stats: RunStats) -> None:
        for work in bands:
            for span in chunks:
                stats.count(tasks_dispatched=1)
                out, work.state = run_chunk(kind, chunk_inputs(kind, work, span), work.const, work.state, cfg, stats)
                work.outs.append(out)

    def close(self) -> None:
        pass


class QueuedScheduler:
    """A pool of `workers` threads fed chunk tasks: at most `workers` tasks are in flight at once, and a
    band's next chunk is submitted only once its previous chunk is back (strict time order per band).

    Torch kernels release the GIL, so bands overlap on the device; with `streams` > 0 band b's chunks are
    issued on stream b mod `streams` (one band keeps one stream, so its chunks stay ordered on the
    device too), and the caller's stream waits for all of them.
    """

    name = "queued"

    def __init__(self, workers: int, streams: int, device: torch.device):
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xlstm-queued")
        self.device = device
        self.streams = [dev.new_stream(device) for _ in range(streams)] if streams else []

    def _run(self, kind: str, seq: tuple, const: tuple, state: tuple, cfg: TileConfig, stats: RunStats,
             band: int) -> tuple[Tensor, tuple]:
        stream = self.streams[band % len(self.streams)] if self.streams else None
        if stream is not None:
            stats.count(stream_tasks=1)
        # Grad mode is thread-local: worker threads must enter inference mode themselves.
        with torch.inference_mode(), dev.stream_context(stream):
            return run_chunk(kind, seq, const, state, cfg, stats)

    def run_bands(self, kind: str, bands: list[BandWork], chunks: list[tuple[int, int]], cfg: TileConfig,
                  stats: RunStats) -> None:
        if self.streams:
            dev.wait_for_current(self.device, self.streams)  # inputs were produced on the current stream
        ready = deque(range(len(bands)))  # bands whose next chunk may start
        in_flight: dict[Future, int] = {}
        try:
            while ready or in_flight:
                while ready and len(in_flight) < self.workers:
                    b = ready.popleft()
                    work = bands[b]
                    seq = chunk_inputs(kind, work, chunks[len(work.outs)])
                    in_flight[self.pool.submit(self._run, kind, seq, work.const, work.state, cfg, stats, b)] = b
                    stats.count(tasks_dispatched=1)
                    stats.peak(len(in_flight))
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in done:
                    b = in_flight.pop(fut)
                    out, bands[b].state = fut.result()
                    bands[b].outs.append(out)
                    if len(bands[b].outs) < len(chunks):
                        ready.append(b)
        except BaseException:
            for fut in in_flight:
                fut.cancel()
            wait(in_flight)  # no task of this call keeps running after it raised
            raise
        if self.streams:
            dev.join_streams(self.device, self.streams)

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
        self.scheduler = make_scheduler(options, device)  # native: inline (sLSTM's step tiles run there)

    def _bands(self, num_heads: int) -> list[tuple[int, int]]:
        if self.options.backend == "native":
            return [(0, num_heads)]
        return head_bands(num_heads, min(self.options.heads_per_band, num_heads))

    def _run_bands(self, kind: str, bands: list[BandWork], seq_len: int) -> None:
        self.scheduler.run_bands(kind, bands, spans(seq_len, self.options.chunk_size), self.tile, self.stats)

    def mlstm(self, q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: State) -> tuple[Tensor, State]:
        """q, k: [B,H,S,K]; v: [B,H,S,V]; i, f: [B,H,S]; state float32. Returns h float32 [B,H,S,V]."""
        self.stats.count(tokens_prefilled=q.shape[2])
        if self.options.backend == "native":
            # One task over all heads, run inline: the kernel reads the projection's strided views as
            # they are (copying them cost ~5% of a 7B prefill).
            self.stats.count(tasks_dispatched=1)
            return mlstm_chunk_tile(q, k, v, i, f, state, self.tile, self.stats)
        bands = []
        for h0, h1 in self._bands(q.shape[1]):
            sl = slice(h0, h1)  # bands travel to other threads/processes: own, contiguous memory
            bands.append(BandWork(seq=tuple(x[:, sl].contiguous() for x in (q, k, v, i, f)), const=(),
                                  state=tuple(s[:, sl].contiguous() for s in state)))
        self._run_bands("mlstm", bands, q.shape[2])
        h = _cat([_cat(w.outs, dim=2) for w in bands], dim=1)
        new_state = tuple(_cat([w.state[j] for w in bands], dim=1) for j in range(3))
        return h, new_state  # type: ignore[return-value]

    def slstm(self, wx: Tensor, r: Tensor, b: Tensor, state: SState) -> tuple[Tensor, SState]:
        """wx: [B,S,4,H,D]; r: [H,D,4,D]; b: [H,4,D]; state (y,c,n,m) [B,H,D]. Returns y [B,S,H,D]."""
        bands = []
        for h0, h1 in self._bands(wx.shape[3]):
            sl = slice(h0, h1)
            bands.append(BandWork(seq=(wx[:, :, :, sl].contiguous(),), const=(r[sl].contiguous(), b[sl].contiguous()),
                                  state=tuple(s[:, sl].contiguous() for s in state)))
        self._run_bands("slstm", bands, wx.shape[1])
        y = _cat([_cat(w.outs, dim=1) for w in bands], dim=2)
        new_state = tuple(_cat([w.state[j] for w in bands], dim=1) for j in range(4))
        return y, new_state  # type: ignore[return-value]

    def close(self) -> None:
        self.scheduler.close()
