"""The device layer: the ONLY place in the project that branches on device type (docs/DESIGN.md §2).

Everything above (schedulers, bench/, model/) asks this module instead of testing `device.type`, so adding
or fixing a device means editing one file. Devices are `cpu`, `cuda[:N]` and `mps`.

Rules this module keeps:
- never fall back silently: a device (or device feature) that is not here raises `DeviceUnavailableError`
  whose one-line message names the problem and the fix;
- clocks are read only after the device is synchronised (`now_synced`, docs/DESIGN.md §5);
- availability probes are cheap (no compile, no graph capture) so the study can call them per trial.

Memory figures are in MB = 2**20 bytes.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import psutil
import torch

from xlstm_tune.errors import DeviceUnavailableError, UserError

DEVICE_TYPES = ("cpu", "cuda", "mps")
_MB = float(2**20)


def _mb(n_bytes: float) -> float:
    return float(n_bytes) / _MB


def _as_device(device: str | torch.device) -> torch.device:
    """A torch.device from an already-resolved name ("auto" is for `resolve_device` only)."""
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


# ---- choosing a device -----------------------------------------------------------------------------
def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turn a user's device request into a torch.device that works here.

    "auto" picks mps, then cuda, then cpu (Apple Silicon first: the product's primary target).
    An explicit request that cannot be honoured raises DeviceUnavailableError: benchmarking on another
    device than the one asked for would silently produce the wrong numbers. CUDA and MPS devices come
    back with an explicit index, so they compare equal to `tensor.device`.
    """
    if isinstance(name, torch.device):
        text = str(name)
    elif isinstance(name, str):
        text = name.strip().lower()
    else:
        raise UserError(f"device must be a string or torch.device, got {name!r}: use auto, cpu, cuda, cuda:N or mps")

    if text == "auto":
        if _mps_available():
            return torch.device("mps", 0)
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    kind, _, index_text = text.partition(":")
    if kind not in DEVICE_TYPES or (index_text and not index_text.isdigit()) or (kind == "cpu" and index_text not in ("", "0")):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    index = int(index_text) if index_text else None

    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"device {text!r} requested but torch.cuda.is_available() is False on this machine "
                f"(no NVIDIA GPU/driver, or a CPU-only torch build): use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if index is None:
            index = torch.cuda.current_device()
        if index >= count:
            raise DeviceUnavailableError(
                f"device {text!r} requested but this machine has {count} CUDA device(s): "
                f"use cuda:0..cuda:{count - 1} or auto"
            )
        return torch.device("cuda", index)
    # mps
    if not _mps_available():
        raise DeviceUnavailableError(
            f"device {text!r} requested but torch.backends.mps.is_available() is False on this machine "
            f"(MPS needs Apple Silicon, macOS 12.3+ and an MPS-enabled torch build): use --device cpu or auto"
        )
    if index not in (None, 0):
        raise DeviceUnavailableError(f"device {text!r} requested but MPS has only device 0: use mps or auto")
    return torch.device("mps", 0)


def worker_devices(text: str) -> list[str]:
    """One device per worker from `--devices`: `cuda:0,cuda:1`, `cpu,cpu,cpu` or `cpu:3` (3 CPU workers).

    A CPU has no index, so `cpu:N` counts workers; every other entry names one device (repeat it to put
    several workers on it). Each entry is checked to exist here.
    """
    items = [t.strip().lower() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"--devices {text!r} names no device: use e.g. cuda:0,cuda:1 or cpu:3")
    out: list[str] = []
    for item in items:
        kind, _, count = item.partition(":")
        if kind == "cpu" and count:
            if not count.isdigit() or int(count) < 1:
                raise UserError(f"--devices entry {item!r}: cpu:N needs a worker count N >= 1, e.g. cpu:3")
            out += ["cpu"] * int(count)
            continue
        if item == "auto":
            raise UserError("--devices takes explicit devices (auto picks one): use e.g. cuda:0,cuda:1 or cpu:3")
        out.append(str(resolve_device(item)))
    return out


def isolated_device(name: str) -> tuple[str, dict[str, str]]:
    """(the device as a worker that may see only `name` calls it, the environment that hides the others).

    `cuda:N` -> (`cuda:0`, CUDA_VISIBLE_DEVICES=<N's physical id>): a worker can touch no other GPU, and
    libraries that default to device 0 land on the right one. A CPU worker sees no GPU.
    """
    dev = resolve_device(name)
    if dev.type == "cpu":
        return "cpu", {"CUDA_VISIBLE_DEVICES": ""}  # a CPU worker touches no GPU ("auto" there is the CPU)
    if dev.type != "cuda":
        return str(dev), {}
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[dev.index] if dev.index is not None and dev.index < len(visible) else str(dev.index)
    return "cuda:0", {"CUDA_VISIBLE_DEVICES": physical}


# ---- clocks and memory -----------------------------------------------------------------------------
def synchronize(device: str | torch.device) -> None:
    """Wait for all queued work on `device`; device calls are asynchronous, so timing needs this."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def now_synced(device: str | torch.device) -> float:
    """`time.perf_counter()` read after synchronising `device`, so it counts finished work only."""
    synchronize(device)
    return time.perf_counter()


def empty_cache(device: str | torch.device) -> None:
    """Return the caching allocator's unused blocks to the driver (no-op on CPU: there is no cache)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.empty_cache()
    elif dev.type == "mps":
        torch.mps.empty_cache()


def memory_stats(device: str | torch.device) -> dict[str, float]:
    """Memory figures in MB for `device`, plus the pair the memory watchdog compares with its limits.

    Always: `process_rss_mb`, `system_available_mb`, `system_total_mb`.
    CUDA adds `cuda_allocated_mb`, `cuda_reserved_mb`, `device_free_mb`, `device_total_mb`;
    MPS adds `mps_current_mb`, `mps_driver_mb`, `mps_recommended_max_mb`.

    `watched_used_mb` / `watched_total_mb` are what can run out first on each device:
    - MPS: driver-allocated memory / Metal's recommended working-set maximum. The driver figure includes
      the allocator's cached blocks, and Metal starts paging (then fails) past the recommended maximum.
    - CUDA: this process's reserved memory (caching allocator) / the device's total memory. Reserved, not
      allocated, because cached blocks are just as unavailable to others; this process only, so another
      process on the same GPU does not trip our limits.
    - CPU: process RSS / total system RAM.
    """
    dev = _as_device(device)
    vm = psutil.virtual_memory()
    rss = _mb(psutil.Process().memory_info().rss)
    stats: dict[str, float] = {
        "process_rss_mb": rss,
        "system_available_mb": _mb(vm.available),
        "system_total_mb": _mb(vm.total),
    }
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        stats["cuda_allocated_mb"] = _mb(torch.cuda.memory_allocated(dev))
        stats["cuda_reserved_mb"] = _mb(torch.cuda.memory_reserved(dev))
        stats["device_free_mb"] = _mb(free)
        stats["device_total_mb"] = _mb(total)
        stats["watched_used_mb"] = stats["cuda_reserved_mb"]
        stats["watched_total_mb"] = stats["device_total_mb"]
    elif dev.type == "mps":
        stats["mps_current_mb"] = _mb(torch.mps.current_allocated_memory())
        stats["mps_driver_mb"] = _mb(torch.mps.driver_allocated_memory())
        recommended = getattr(torch.mps, "recommended_max_memory", None)  # torch >= 2.3
        # Unified memory: without Metal's figure, system RAM is the honest ceiling.
        stats["mps_recommended_max_mb"] = _mb(recommended()) if recommended else stats["system_total_mb"]
        stats["watched_used_mb"] = stats["mps_driver_mb"]
        stats["watched_total_mb"] = stats["mps_recommended_max_mb"]
    else:
        stats["watched_used_mb"] = rss
        stats["watched_total_mb"] = stats["system_total_mb"]
    return stats


def watched_memory_label(device: str | torch.device) -> str:
    """What `watched_used_mb` measures on `device`, in words, for watchdog messages and logs."""
    kind = _as_device(device).type
    return {"cuda": "CUDA reserved", "mps": "MPS driver-allocated"}.get(kind, "process RSS")


# ---- streams, compile, graphs ----------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mps_stream_factory() -> Any:
    """A callable making a new MPS stream, or None when this torch build has no usable one.

    Current MPS builds run everything on one command queue: `torch.Stream(device="mps")` may exist but
    hand back that same default stream, which would make `streams > 0` a knob that does nothing. A stream
    counts as usable only if a new one differs from the current stream.
    """
    if not _mps_available():
        return None
    factory = getattr(torch.mps, "Stream", None)
    if factory is None:
        factory = functools.partial(torch.Stream, device="mps")
    try:
        stream = factory()
        current = torch.accelerator.current_stream(torch.device("mps", 0))
        if getattr(stream, "stream_id", None) == getattr(current, "stream_id", None):
            return None
    except Exception:  # any failure means "not usable here"; the probe must never crash a study
        return None
    return factory


def streams_available(device: str | torch.device) -> bool:
    """Whether `new_stream` can give an extra device stream here (the `streams` knob needs one)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available()
    if dev.type == "mps":
        return _mps_stream_factory() is not None
    return False


def new_stream(device: str | torch.device) -> Any:
    """A new device stream; raises DeviceUnavailableError where the device has none (never a fake one)."""
    dev = _as_device(device)
    if not streams_available(dev):
        raise DeviceUnavailableError(
            f"device streams are not available on {dev} with torch {torch.__version__}: use --streams 0"
        )
    if dev.type == "cuda":
        return torch.cuda.Stream(device=dev)
    return _mps_stream_factory()()


def stream_context(stream: Any | None) -> contextlib.AbstractContextManager[Any]:
    """A context manager that makes `stream` current; a no-op context for None (no streams in use)."""
    if stream is None:
        return contextlib.nullcontext()
    if isinstance(stream, torch.cuda.Stream):
        return torch.cuda.stream(stream)
    return stream  # a generic torch.Stream is itself a context manager that makes it current


def _current_stream(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.cuda.current_stream(device)
    return torch.accelerator.current_stream(device)


def wait_for_current(device: str | torch.device, streams: Sequence[Any]) -> None:
    """Make each side stream wait for the work already queued on the current stream (their inputs)."""
    current = _current_stream(_as_device(device))
    for stream in streams:
        stream.wait_stream(current)


def join_streams(device: str | torch.device, streams: Sequence[Any]) -> None:
    """Make the current stream wait for everything queued on the side streams (their outputs)."""
    current = _current_stream(_as_device(device))
    for stream in streams:
        current.wait_stream(stream)


def capture_graph(device: str | torch.device, fn: Callable[[], Any], warmup: int = 3, *, pool: Any = None,
                  capture_error_mode: str = "global") -> tuple[Any, Any]:
    """Capture `fn()` into a device graph; returns (graph, fn's output held in static buffers).

    `fn` runs `warmup` times on a side stream first (CUDA requires it before capture, and it keeps lazy
    initialisation and autotuning out of the graph), so any in-place side effects of `fn` happen
    `warmup` + 1 times. `graph.replay()` reruns the captured work on the same buffers. `pool` shares a
    memory pool between graphs (`torch.cuda.graph_pool_handle()`); `capture_error_mode="thread_local"`
    lets other threads (a memory watchdog's polls) call CUDA during the capture.
    """
    dev = _as_device(device)
    if not graphs_available(dev):
        raise DeviceUnavailableError(
            f"device graphs are not available on {dev} (only CUDA has them): use decode_mode=compiled or eager"
        )
    with torch.cuda.device(dev):
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=capture_error_mode):
            out = fn()
    return graph, out


def graph_memory_pool(device: str | torch.device) -> Any:
    """A memory pool that several captured graphs can share (`capture_graph(pool=...)`)."""
    dev = _as_device(device)
    if not graphs_available(dev):
        raise DeviceUnavailableError(f"device graphs are not available on {dev} (only CUDA has them)")
    with torch.cuda.device(dev):
        return torch.cuda.graph_pool_handle()


def uses_tf32_cell_products(x: torch.Tensor) -> bool:
    """Whether the mLSTM cell's float32 matrix products for inputs like `x` run as TF32 on tensor cores.

    Only on CUDA and only for bf16/fp16 models: their q, k, v are bf16/fp16 values, which TF32 holds
    exactly, so q·kᵀ is unchanged and only the float32 decay-weighted operands and states are read at
    TF32's 2**-11 (an order below the model's own bf16 rounding, 2**-8). Float32 models keep IEEE products:
    their parity bound (1e-4) would not survive TF32. XLSTM_TF32_CELL=0 turns it off (A/B measurements).
    """
    return (x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("XLSTM_TF32_CELL", "1").strip() != "0")


@contextlib.contextmanager
def tf32_cell_products(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA float32 matrix products while the block runs, restored after (`enabled` from
    `uses_tf32_cell_products`). The setting is process-wide; the cell runs it from one thread (`native`)."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has the precision setting; older releases only the (since deprecated) TF32 switch
    name, value = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    prior = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, prior)


def float64_device(device: str | torch.device) -> torch.device:
    """Where float64 math on this device's tensors should run: the device itself, or the CPU for MPS
    (which has no float64)."""
    dev = _as_device(device)
    return dev if dev.type == "cuda" else torch.device("cpu")


def safetensors_read_device(device: str | torch.device) -> str:
    """Where to read checkpoint tensors before copying them into the model: straight to CUDA/CPU; MPS is
    not a safetensors target on every build, so via the CPU one tensor at a time."""
    dev = _as_device(device)
    return "cpu" if dev.type == "mps" else str(dev)


def needs_gpu_placement(device: str | torch.device) -> bool:
    """Whether work for this device, run in another process (Ray actors), must be placed on a CUDA GPU."""
    return _as_device(device).type == "cuda"


def _triton_kernels(device: str | torch.device, switch: str, module: str) -> ModuleType | None:
    """`xlstm_tune.kernels.<module>` on CUDA where Triton imports, unless the A/B switch `switch` is 0."""
    if _as_device(device).type != "cuda" or os.environ.get(switch, "1").strip() == "0":
        return None
    try:
        return importlib.import_module(f"xlstm_tune.kernels.{module}")
    except ImportError:
        return None


def matvec_fn(device: str | torch.device) -> Callable[..., Any] | None:
    """The batch-1 matrix-vector kernel for this device, or None to use the framework's GEMM.

    CUDA with Triton gets the Triton GEMV (decode at batch 1 is weight-bandwidth bound);
    XLSTM_TRITON_GEMV=0 turns it off (A/B measurements, debugging).
    """
    kernels = _triton_kernels(device, "XLSTM_TRITON_GEMV", "gemv_triton")
    return None if kernels is None else kernels.gemv


def check_prefill_graphs(device: str | torch.device) -> None:
    """Refuse the prefill_graph switch on a device without graphs (only CUDA has them), never ignore it."""
    dev = _as_device(device)
    if not graphs_available(dev):
        raise DeviceUnavailableError(
            f"prefill_graph needs device graphs (CUDA); {dev.type} has none: set prefill_graph = false "
            "(XLSTM_PREFILL_GRAPH=0, --no-prefill-graph)")


def prefill_graphs_enabled(device: str | torch.device) -> bool:
    """Whether native prefills replay captured device graphs: XLSTM_PREFILL_GRAPH=1 (off by default).

    Read per call, like the other switches; on, on a device without graphs, it raises (`check_prefill_graphs`).
    """
    from xlstm_tune.runtime.options import _as_bool

    raw = os.environ.get("XLSTM_PREFILL_GRAPH", "").strip()
    if not raw or not _as_bool("XLSTM_PREFILL_GRAPH", raw):
        return False
    check_prefill_graphs(device)
    return True


def fused_decode_kernels(device: str | torch.device) -> ModuleType | None:
    """The fused decode kernels (batch 1..16) (`kernels.decode_triton`) for this device, or None.

    CUDA with Triton gets them (`decode_mode=graph` captures a step built on them);
    XLSTM_FUSED_DECODE=0 turns them off (A/B measurements, debugging).
    """
    return _triton_kernels(device, "XLSTM_FUSED_DECODE", "decode_triton")


def _cxx_compiler_on_path() -> bool:
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    return any(c and shutil.which(c) for c in candidates)


def compile_available(device: str | torch.device) -> bool:
    """Whether torch.compile can work on `device`, judged cheaply (no compile is attempted).

    Needs TorchDynamo on this Python; CPU code generation needs a C++ compiler on PATH; CUDA needs triton
    (and a GPU triton supports, compute capability 7.0+). MPS generates Metal shaders itself.
    """
    dev = _as_device(device)
    try:
        import torch._dynamo  # noqa: F401  (absent or broken on some Python versions / builds)

        if not torch._dynamo.is_dynamo_supported():
            return False
    except Exception:
        return False
    if dev.type == "cpu":
        return _cxx_compiler_on_path()
    if dev.type == "cuda":
        return (
            torch.cuda.is_available()
            and importlib.util.find_spec("triton") is not None
            and torch.cuda.get_device_capability(dev) >= (7, 0)
        )
    return _mps_available()


def graphs_available(device: str | torch.device) -> bool:
    """Whether device graphs (capture/replay) exist here: CUDA graphs only, so `decode_mode=graph` needs CUDA."""
    dev = _as_device(device)
    return dev.type == "cuda" and torch.cuda.is_available()


# ---- names and provenance --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _cpu_model() -> str:
    system = platform.system()
    if system == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif system == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the hardware behind `device`, for provenance and reports."""
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "mps":
        mac = platform.mac_ver()[0]
        return f"Apple MPS ({_cpu_model()}{', macOS ' + mac if mac else ''})"
    return _cpu_model()


def device_summary(device: str | torch.device) -> dict[str, str]:
    """Where a measurement was taken (best.json provenance): numbers from different rows never compare."""
    dev = _as_device(device)
    return {
        "device_name": device_name(dev),
        "device_type": dev.type,
        "device": str(dev),
        "os": platform.platform(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }


# ---- threads and machine load ----------------------------------------------------------------------
def available_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(psutil.Process().cpu_affinity()))
    except (AttributeError, NotImplementedError, psutil.Error, OSError):
        return max(1, os.cpu_count() or 1)


def physical_cpus() -> int:
    """Physical cores among the CPUs this process may use (hyper-threads share a core's math units)."""
    logical_total = psutil.cpu_count(logical=True) or available_cpus()
    physical_total = psutil.cpu_count(logical=False) or logical_total
    return max(1, available_cpus() * physical_total // logical_total)


def default_threads(device: str | torch.device, concurrent: int = 1) -> int:
    """torch's intra-op thread count for measurements on `device`.

    CPU: the physical cores this process may use, shared among `concurrent` measuring processes (more
    threads than cores only adds contention, the main source of noise on a busy machine), and no more
    than OMP_NUM_THREADS where that is set (a study fleet splits the cores among its workers that way).
    CUDA/MPS: the host threads only launch kernels and run small CPU ops, so a few are enough.
    """
    dev = _as_device(device)
    if dev.type == "cpu":
        n = max(1, physical_cpus() // max(1, int(concurrent)))
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        return max(1, min(n, int(omp))) if omp.isdigit() and int(omp) > 0 else n
    return max(1, min(4, available_cpus()))


def default_interop_threads(device: str | torch.device) -> int:
    """torch's inter-op thread count: 1 on every device; the queued backend runs its own thread pool."""
    _as_device(device)
    return 1


def accelerator_load(device: str | torch.device) -> dict[str, Any]:
    """GPU utilisation and clocks where they can be read (CUDA through NVML), else {}; never raises."""
    dev = _as_device(device)
    if dev.type != "cuda":
        return {}
    out: dict[str, Any] = {}
    for key, name in (("gpu_util_pct", "utilization"), ("gpu_mem_util_pct", "memory_usage"),
                      ("gpu_clock_mhz", "clock_rate"), ("gpu_temperature_c", "temperature"),
                      ("gpu_power_mw", "power_draw")):
        try:
            out[key] = float(getattr(torch.cuda, name)(dev))
        except Exception:  # noqa: BLE001 - NVML absent, no permission, an old driver: simply not readable
            continue
    return out
