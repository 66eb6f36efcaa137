"""Ray scheduler: one Ray actor per head band, reused for every layer, and by later runtimes of the process.

A task is one chunk of one band: the scheduler makes one remote call per chunk, and the band's actor keeps
the band's float32 state between the calls of one cell (the state travels in with the first chunk and
back with the last, not with every chunk). Ray runs the calls one caller makes on one actor in the order
they were made, so the chunks of a band run in time order; different bands run on different actors.

Ray's in-process `local_mode` no longer exists (Ray 2.x removed it), so actors are separate processes and
chunk inputs travel through Ray's object store as CPU tensors; each actor computes on the model's device
type and sends results back. That copy is the price of this backend: it is measured, not hidden.

Environment (seed system names, their meaning now):
* XLSTM_RAY_LOCAL_MODE=1 (default): start a private Ray runtime for this process: it listens on
  127.0.0.1 only, keeps its files in its own temporary folder, runs no dashboard, and is found by no
  other process. 0: join the running cluster: `RAY_ADDRESS`, else the cluster that `ray start --head`
  recorded in Ray's temporary folder (`RAY_TMPDIR`, default /tmp/ray). Unlike Ray's own
  `address="auto"`, no other Ray process found on the machine is ever joined.
* XLSTM_RAY_AUTOSHUTDOWN=1 (default): shut down the private runtime when the process exits (normal exit,
  exception or Ctrl-C) and remove its folder; 0 leaves both to Ray (its processes still end with this
  process: Ray ties them to the process that started them; the folder stays).
* XLSTM_RAY_INIT_TIMEOUT_S (default 120): how long starting or joining Ray may take before it is an error.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import tempfile
import threading
from typing import Any

import torch

from xlstm_tune.errors import DeviceUnavailableError, UserError
from xlstm_tune.runtime import device as dev
from xlstm_tune.runtime.options import RuntimeOptions
from xlstm_tune.runtime.tiles import BandWork, RunStats, TileConfig, chunk_inputs, run_chunk

_LOCK = threading.Lock()
_PRIVATE_DIR: str | None = None  # temp folder of the private runtime this process started
_PROBE_S = 5.0  # a cluster's GCS port that does not accept a connection in this time is not there
_FIX = "pick --backend queued or native"
# Band actors no runtime holds, per (Ray job, device): a new runtime (new knobs, the next trial) takes
# these before it starts new processes, which cost seconds each.
_IDLE: dict[tuple[str, str], list[Any]] = {}


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name} must be 0 or 1, got {value!r}")


def _init_timeout() -> float:
    raw = os.environ.get("XLSTM_RAY_INIT_TIMEOUT_S", "").strip() or "120"
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"XLSTM_RAY_INIT_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise UserError(f"XLSTM_RAY_INIT_TIMEOUT_S must be > 0, got {raw!r}")
    return value


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}"


def _single_machine_mode() -> None:
    """Make Ray keep loopback addresses as they are.

    On Linux Ray replaces 127.0.0.1 by the machine's outward address (so that other hosts can join),
    and its servers then listen on every interface. Its single-machine mode (the default on macOS and
    Windows) keeps 127.0.0.1, and the servers then listen on loopback only.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is first imported ...
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # ... and this, in case it was imported already


# Ray puts sockets at <root>/xlstm-ray-XXXXXXXX/session_<date>_<time>_<pid>/sockets/plasma_store, ~85 bytes
# below the root, and a socket path must fit 107 bytes.
MAX_TEMP_ROOT_CHARS = 20


def _short_temp_root() -> str:
    """The temp folder, unless its path is too long for the sockets Ray puts under it: then /tmp."""
    root = tempfile.gettempdir()
    return root if len(root) <= MAX_TEMP_ROOT_CHARS or not os.path.isdir("/tmp") else "/tmp"


def shutdown_private_runtime() -> None:
    """Stop the private runtime this process started (if any) and remove its folder."""
    global _PRIVATE_DIR
    with _LOCK:
        import ray

        if _PRIVATE_DIR is None:
            return
        _IDLE.clear()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(_PRIVATE_DIR, ignore_errors=True)
        _PRIVATE_DIR = None


def _cluster_address() -> str:
    """The running cluster to join: RAY_ADDRESS, else the one `ray start` recorded; a UserError if none."""
    import ray._private.utils as ray_utils

    address = os.environ.get("RAY_ADDRESS", "").strip()
    source = "RAY_ADDRESS"
    if not address:
        address = (ray_utils.read_ray_address() or "").strip()  # honours RAY_TMPDIR
        source = "the cluster file of `ray start` in Ray's temp folder (RAY_TMPDIR)"
    if not address:
        raise UserError("Ray could not start the running cluster (XLSTM_RAY_LOCAL_MODE=0): none found "
                        "(RAY_ADDRESS is empty and `ray start --head` recorded none); start one with "
                        f"`ray start --head`, set XLSTM_RAY_LOCAL_MODE=1 for a private runtime, or {_FIX}")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=_PROBE_S):
            pass
    except (OSError, ValueError) as exc:
        raise UserError(f"Ray could not start the running cluster (XLSTM_RAY_LOCAL_MODE=0): nothing answers at "
                        f"{address} (from {source}: {_one_line(exc)}); check `ray status`, or {_FIX}") from None
    if host in ("127.0.0.1", "localhost"):
        _single_machine_mode()  # a cluster on loopback is reached on loopback
    return address


class _InitTimeout(Exception):
    pass


def _init(ray: Any, where: str, **kwargs: Any) -> None:
    """ray.init of the private runtime under a time limit (Ray has none of its own for a hung start).

    The call stays in the calling thread: Ray ties the processes it starts to the thread that started
    them (they die with it). In the main thread the limit is a SIGALRM timer; elsewhere, where signals
    cannot be used, Ray's own start-up limits apply.
    """
    timeout = _init_timeout()

    def on_alarm(signum: int, frame: Any) -> None:
        raise _InitTimeout()

    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous = signal.signal(signal.SIGALRM, on_alarm) if use_alarm else None
    if use_alarm:
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    except _InitTimeout:
        _quiet_shutdown(ray)
        raise UserError(f"Ray could not start {where} within {timeout:g} s (XLSTM_RAY_INIT_TIMEOUT_S); "
                        f"check `ray status`, or {_FIX}") from None
    except Exception as exc:  # Ray raises many types (ConnectionError, RuntimeError, ValueError)
        _quiet_shutdown(ray)
        if _wants_token(exc):
            raise UserError(f"Ray could not start {where}: {_TOKEN_FIX}") from None
        raise UserError(f"Ray could not start {where}: {_one_line(exc)}; check `ray status`, or {_FIX}") from None
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


_TOKEN_FIX = ("the cluster wants its authentication token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
              "(or RAY_AUTH_TOKEN_PATH)")


def _wants_token(exc: BaseException) -> bool:
    """Ray 2.60 clusters started with a token refuse drivers without one (the cause of a ConnectionError)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if type(seen).__name__ == "AuthenticationError" or "AuthToken" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def join_cluster(address: str, fix: str, timeout: float) -> Any:
    """Join a running Ray cluster as a driver within `timeout` s; a one-line UserError ending in `fix`."""
    with _LOCK:
        try:
            import ray
        except ImportError:
            raise UserError("Ray is not installed: pip install 'ray>=2.60'") from None
        if not ray.is_initialized():
            _join(ray, address, fix, timeout)
        return ray


def _join(ray: Any, address: str, fix: str, timeout: float) -> None:
    """ray.init as a driver of the cluster at `address`, waited for with a deadline.

    The connection is made in a helper thread: while Ray retries an address that does not answer it sits
    in native code, where a SIGALRM handler does not run. A driver starts no processes of its own, so
    the thread does not matter to what Ray starts (unlike `_init` of a private runtime).
    """
    done = threading.Event()
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=connect, name="ray-connect", daemon=True).start()
    if not done.wait(timeout):
        raise UserError(f"Ray could not join the cluster at {address} within {timeout:g} s; {fix}")
    if failure:
        _quiet_shutdown(ray)
        if _wants_token(failure[0]):
            raise UserError(f"Ray could not join the cluster at {address}: {_TOKEN_FIX}") from None
        raise UserError(f"Ray could not join the cluster at {address}: {_one_line(failure[0])}; {fix}") from None


def _quiet_shutdown(ray: Any) -> None:
    """Undo a half-done start (processes it spawned), ignoring what fails on the way."""
    try:
        ray.shutdown()
    except Exception:
        pass


def ensure_ray() -> Any:
    """Start the private runtime (or join the running cluster) once per process; a one-line UserError
    when that fails or takes longer than XLSTM_RAY_INIT_TIMEOUT_S."""
    global _PRIVATE_DIR
    with _LOCK:
        try:
            import ray
        except ImportError:
            raise UserError("the ray backend needs the `ray` package: pip install 'ray>=2.60'") from None
        if ray.is_initialized():
            return ray
        if not _flag("XLSTM_RAY_LOCAL_MODE", True):
            _join(ray, _cluster_address(), f"check `ray status`, or {_FIX}", _init_timeout())
            return ray
        autoshutdown = _flag("XLSTM_RAY_AUTOSHUTDOWN", True)
        _single_machine_mode()
        folder = tempfile.mkdtemp(prefix="xlstm-ray-", dir=_short_temp_root())
        try:
            _init(ray, "a private local runtime", address="local", _node_ip_address="127.0.0.1", _temp_dir=folder)
        except UserError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if autoshutdown:
            _PRIVATE_DIR = folder
            atexit.register(shutdown_private_runtime)
        return ray


def _to_cpu(x: Any) -> Any:
    """CPU tensors of their own: a view would pickle its whole base tensor into the object store."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_cpu(y) for y in x)
    return x


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(y, device) for y in x)
    return x


class _BandWorker:
    """Runs the chunks of one band inside its own process, holding the band's state between them."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.const: tuple = ()
        self.state: tuple = ()

    def run_chunk(self, kind: str, seq: tuple, const: tuple | None, state: tuple | None, cfg: TileConfig,
                  last: bool) -> tuple[Any, Any, dict]:
        """One chunk. `const`/`state` come with a cell's first chunk; the state goes back with its last."""
        if state is not None:
            self.const, self.state = _to(const, self.device), _to(state, self.device)
        stats = RunStats()
        with torch.inference_mode():
            out, self.state = run_chunk(kind, _to(seq, self.device), self.const, self.state, cfg, stats)
        return _to_cpu(out), (_to_cpu(self.state) if last else None), stats.as_dict()


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
        self._pool_key = (self.ray.get_runtime_context().get_job_id(), str(device))

    def _ensure_actors(self, n: int) -> None:
        while len(self.actors) < n:  # taken once, grown only when a call needs more bands
            with _LOCK:
                idle = _IDLE.get(self._pool_key)
                actor = idle.pop() if idle else None
            self.actors.append(actor if actor is not None else self._remote.remote(str(self.device)))

    def run_bands(self, kind: str, bands: list[BandWork], chunks: list[tuple[int, int]], cfg: TileConfig,
                  stats: RunStats) -> None:
        """All chunk calls are made up front: each actor runs its band's calls in order, bands at once."""
        self._ensure_actors(len(bands))
        refs = []
        for actor, work in zip(self.actors, bands):
            for n, span in enumerate(chunks):
                first = n == 0
                refs.append(actor.run_chunk.remote(kind, _to_cpu(chunk_inputs(kind, work, span)),
                                                   _to_cpu(work.const) if first else None,
                                                   _to_cpu(work.state) if first else None, cfg, n == len(chunks) - 1))
                stats.count(tasks_dispatched=1, ray_remote_calls=1)
        results = iter(self.ray.get(refs))
        for work in bands:
            for _ in chunks:
                out, state, chunk_stats = next(results)
                stats.merge(chunk_stats)
                work.outs.append(_to(out, self.device))
            work.state = _to(state, self.device)

    def close(self) -> None:
        """Hand the actors back for the next runtime (each cell's first chunk loads its own state)."""
        with _LOCK:
            if self.ray.is_initialized():
                _IDLE.setdefault(self._pool_key, []).extend(self.actors)
        self.actors = []
