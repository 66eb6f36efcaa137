"""Ray scheduler: one Ray actor per head band, created once per model and options, reused for every layer.

Ray's in-process `local_mode` no longer exists (Ray 2.x removed it), so actors are separate processes and
band inputs travel through Ray's object store as CPU tensors; each actor computes on the model's device
type and sends results back. That copy is the price of this backend: it is measured, not hidden.

Environment (seed system names, their meaning now):
* XLSTM_RAY_LOCAL_MODE=1 (default): start a private Ray runtime on this machine (`address="local"`);
  0: join the running cluster (`address="auto"`, e.g. one started with `ray start --head`).
* XLSTM_RAY_AUTOSHUTDOWN=1 (default): shut down the Ray runtime we started when the process exits
  (normal exit, exception or Ctrl-C); 0 leaves it running for later processes.
"""
from __future__ import annotations

import atexit
import os
import threading
from typing import Any

import torch

from xlstm_tune.errors import DeviceUnavailableError, UserError
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.options import RuntimeOptions
from xlstm_tune.runtime.tiles import RunStats, TileConfig

_LOCK = threading.Lock()
_STARTED_BY_US = False


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name} must be 0 or 1, got {value!r}")


def _shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def ensure_ray() -> Any:
    """Start (or join) Ray once per process; a clear error when it cannot start."""
    global _STARTED_BY_US
    with _LOCK:
        try:
            import ray
        except ImportError:
            raise UserError("the ray backend needs the `ray` package: pip install 'ray>=2.60'") from None
        if ray.is_initialized():
            return ray
        local = _flag("XLSTM_RAY_LOCAL_MODE", True)
        try:
            ray.init(address="local" if local else "auto", include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
        except Exception as exc:  # Ray raises many types (ConnectionError, RuntimeError, ValueError)
            where = "a private local runtime" if local else "the running cluster (XLSTM_RAY_LOCAL_MODE=0)"
            raise UserError(f"Ray could not start {where}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                            "check `ray status`, or pick --backend queued or native") from None
        _STARTED_BY_US = True
        if _flag("XLSTM_RAY_AUTOSHUTDOWN", True):
            atexit.register(_shutdown)
        return ray


class _BandWorker:
    """Runs tile kernels for one band inside its own process."""

    def __init__(self, device: str):
        import torch as _torch

        self.device = _torch.device(device)

    def run(self, kind: str, args: tuple, cfg: TileConfig) -> tuple[Any, dict]:
        import torch as _torch

        from xlstm_tune.runtime.cells import TILE_FNS

        def to_dev(x: Any) -> Any:
            if isinstance(x, _torch.Tensor):
                return x.to(self.device)
            if isinstance(x, tuple):
                return tuple(to_dev(y) for y in x)
            return x

        stats = RunStats()
        with _torch.inference_mode():
            out = TILE_FNS[kind](*to_dev(args), cfg, stats)
        return _to_cpu(out), stats.as_dict()


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu")
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(y) for y in x)
    return x


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(y, device) for y in x)
    return x


class RayScheduler:
    name = "ray"

    def __init__(self, options: RuntimeOptions, device: torch.device):
        self.ray = ensure_ray()
        self.device = device
        self.actors: list[Any] = []
        gpu_share = 0.0
        if dev.needs_gpu_placement(device):
            gpu_share = 0.01  # actors share the one GPU; the share only makes Ray place them on it
            if not self.ray.cluster_resources().get("GPU"):
                raise DeviceUnavailableError("the ray backend on CUDA needs Ray to see the GPU; start Ray with GPUs or use --backend queued")
        self._remote = self.ray.remote(num_cpus=0, num_gpus=gpu_share)(_BandWorker)

    def _ensure_actors(self, n: int) -> None:
        while len(self.actors) < n:  # created once, grown only when a call needs more bands
            self.actors.append(self._remote.remote(str(self.device)))

    def map(self, kind: str, tasks: list[tuple], cfg: TileConfig, stats: RunStats) -> list[Any]:
        self._ensure_actors(len(tasks))
        stats.note(tasks=len(tasks))
        refs = [actor.run.remote(kind, _to_cpu(args), cfg) for actor, args in zip(self.actors, tasks)]
        results = []
        for out, band_stats in self.ray.get(refs):
            for path, calls in band_stats["kernel_paths"].items():
                stats.add(path, calls, is_compiled=path.endswith(".compiled"))
            results.append(_to(out, self.device))
        return results

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:  # the runtime may already be shutting down at exit
                pass
        self.actors = []
