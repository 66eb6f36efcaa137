"""Many trial workers on one study: one process per device (`--devices`), or per GPU of a Ray cluster.

    python -m xlstm_tune study --devices cuda:0,cuda:1      # two workers, one GPU each
    python -m xlstm_tune study --devices cpu:3              # three CPU workers, cores split between them
    python -m xlstm_tune study --ray-address HOST:6379      # one worker per GPU of the cluster

The launching study process opens the study (storage, MLflow experiment and parent run, the baseline
queued), then starts the workers. Each worker is an ordinary study process on the same Optuna storage
and MLflow store (`StudyOptions.trials_only`): it runs trials until the study has `n_trials` COMPLETE
ones and stops, leaving the confirmation round, best.json and the report to the launcher, which does
them once, after every worker has finished. A worker sees only its device (CUDA_VISIBLE_DEVICES, so it
is `cuda:0` inside) and `cores // N` math threads, so CPU workers do not oversubscribe the machine.

The launcher forwards SIGINT and SIGTERM to its workers, waits for them to put their trials back, and
kills whatever is left when it exits; a worker also leaves by itself when its launcher is gone.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from xlstm_tune.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from xlstm_tune.study.runner import StudyOptions, StudyRun

ENV_WORKER = "XLSTM_TUNE_FLEET_WORKER"  # the worker's label, recorded with each trial it runs
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
STOP_GRACE_S = 60.0  # how long stopped workers get to put their running trials back before SIGKILL
RAY_CONNECT_TIMEOUT_S = 30.0


@dataclass
class WorkerPlan:
    """One worker: its label, the device as it sees it, and the environment that isolates it."""

    label: str
    device: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class WorkerReport:
    label: str
    device: str
    returncode: int | None
    pid: int | None = None
    host: str | None = None
    log: str | None = None
    last_line: str = ""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_local(devices: Sequence[str], cores: int) -> list[WorkerPlan]:
    """A worker per device entry, each confined to its device and to cores // N math threads."""
    from xlstm_tune.runtime.device import isolated_device

    threads = str(max(1, cores // max(1, len(devices))))
    plans = []
    for i, name in enumerate(devices):
        device, env = isolated_device(name)
        plans.append(WorkerPlan(f"w{i}-{name.replace(':', '')}", device,
                                {**env, **{v: threads for v in THREAD_VARS}}))
    return plans


def worker_options(run: "StudyRun", plan: WorkerPlan) -> dict[str, Any]:
    """The launcher's options for one worker: same study, storage and store; its own device and folder."""
    from xlstm_tune.study.storage import default_journal_path

    opts = run.opts
    storage = opts.storage if opts.storage is not None else str(default_journal_path(run.out_dir).resolve())
    # The worker asks for the launcher's device (the study's settings must be the same to join it); its
    # environment makes that resolve to the worker's own device (check_devices made sure it does).
    out = dataclasses.replace(
        opts, study_name=run.name, storage=storage, tracking_uri=run.tracking_uri, device=opts.device,
        out_dir=str((run.files.root / "fleet" / plan.label).resolve()), devices=None, ray_address=None,
        trials_only=True, progress=False, warm_start=[],  # the launcher enqueued the warm starts
        experiment=_absolute(opts.experiment), prompt_file=_absolute(opts.prompt_file),
        replay=_absolute(opts.replay), model=_absolute(opts.model))
    return dataclasses.asdict(out)


def _absolute(path: str | None) -> str | None:
    # Workers may start in another folder (Ray): a relative path that exists here is made absolute.
    if path and Path(path).exists():
        return str(Path(path).resolve())
    return path


def check_devices(run: "StudyRun", worker_device: str) -> None:
    """Workers measure on the study's device: the launcher's, as the workers see theirs (cuda:0, cpu)."""
    study_device = str(run.plan.caps.get("device") or "")
    if study_device != worker_device:
        raise UserError(f"the workers measure on {worker_device} but this study's device is {study_device or '?'}: "
                        f"pass --device {worker_device.split(':')[0]} (a study measures on one kind of device)")


def run_fleet(run: "StudyRun") -> list[WorkerReport]:
    """Run the study's trials in worker processes; returns once every worker has stopped."""
    opts = run.opts
    if opts.ray_address:
        reports = RayFleet(opts.ray_address, opts.devices).run(run)
    else:
        from xlstm_tune.runtime.device import worker_devices

        devices = [d for item in opts.devices or [] for d in worker_devices(item)]
        plans = plan_local(devices, usable_cores())
        for p in plans:
            check_devices(run, p.device)
        reports = LocalFleet(plans, run.files.root / "fleet", run.err).run(
            [worker_options(run, p) for p in plans])
    for r in reports:
        where = f" on {r.host}" if r.host else ""
        status = "finished" if r.returncode == 0 else f"exit {r.returncode}"
        run.notes.append(f"worker {r.label} ({r.device}{where}, pid {r.pid}): {status}"
                         + (f": {r.last_line}" if r.returncode and r.last_line else ""))
    if reports and all(r.returncode == 2 for r in reports):
        raise UserError(f"every trial worker refused to start: {reports[0].last_line or 'see ' + str(reports[0].log)}")
    return reports


# ---- worker processes on this machine --------------------------------------------------------------
def worker_command(options: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "xlstm_tune.study.fleet", json.dumps(options)]


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGINT to the worker (it re-queues its trial and stops its trial process), then SIGKILL to its group.

    Only the worker itself gets the SIGINT: its trial process must not die first, or the trial would be
    recorded as a crash instead of an interruption.
    """
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class _Stop(Exception):
    """SIGTERM reached the launcher."""


class LocalFleet:
    """Worker processes on this machine; each in its own process group, its output teed with a prefix."""

    def __init__(self, plans: Sequence[WorkerPlan], log_dir: Path, err: TextIO | None = None) -> None:
        self.plans = list(plans)
        self.log_dir = Path(log_dir)
        self.err = err or sys.stderr
        self.procs: list[subprocess.Popen] = []
        self._tees: list[threading.Thread] = []
        self._last: dict[str, str] = {}
        self._write_lock = threading.Lock()

    def run(self, options: Sequence[dict[str, Any]]) -> list[WorkerReport]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        previous = _install_stop_handlers()
        interrupted: BaseException | None = None
        try:
            for plan, opt in zip(self.plans, options):
                self._start(plan, opt)
            for proc in self.procs:
                proc.wait()
        except (KeyboardInterrupt, _Stop) as exc:
            interrupted = exc
            self.err.write(f"stopping {len(self.procs)} worker(s): their running trials are put back\n")
            self.err.flush()
            stoppers = [threading.Thread(target=stop_group, args=(p,)) for p in self.procs]
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
        finally:
            for proc in self.procs:
                if proc.poll() is None:
                    kill_group(proc)
            for t in self._tees:
                t.join()
            _restore_handlers(previous)
        if interrupted is not None:
            raise KeyboardInterrupt from None
        return [WorkerReport(p.label, p.device, proc.returncode, proc.pid, None, str(self._log(p)),
                             self._last.get(p.label, "")) for p, proc in zip(self.plans, self.procs)]

    def _log(self, plan: WorkerPlan) -> Path:
        return self.log_dir / f"{plan.label}.log"

    def _start(self, plan: WorkerPlan, options: dict[str, Any]) -> None:
        env = {**os.environ, **plan.env, ENV_WORKER: plan.label, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(worker_command(options), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.err.write(f"worker {plan.label}: pid {proc.pid}, device {plan.device}"
                       f"{', threads ' + plan.env['OMP_NUM_THREADS'] if 'OMP_NUM_THREADS' in plan.env else ''}"
                       f", log {self._log(plan)}\n")
        self.err.flush()
        tee = threading.Thread(target=self._tee, args=(plan, proc), name=f"fleet-tee-{plan.label}", daemon=True)
        tee.start()
        self._tees.append(tee)

    def _tee(self, plan: WorkerPlan, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        with open(self._log(plan), "ab", buffering=0) as log:
            for raw in proc.stdout:
                log.write(raw)
                line = raw.decode("utf-8", errors="replace").rstrip()
                if line.strip():
                    self._last[plan.label] = line.strip()
                with self._write_lock:
                    self.err.write(f"[{plan.label}] {line}\n")
                    self.err.flush()


def _install_stop_handlers() -> dict[int, Any]:
    """SIGTERM raises _Stop in the main thread (SIGINT raises KeyboardInterrupt as usual)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    return {signal.SIGTERM: signal.signal(signal.SIGTERM, on_term),
            signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


# ---- worker processes on a Ray cluster --------------------------------------------------------------
def ray_init(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> Any:
    """Connect to a running Ray cluster, or a one-line UserError (also after `timeout_s`)."""
    from xlstm_tune.runtime.ray_scheduler import join_cluster

    return join_cluster(address, "start it (ray start --head) or fix --ray-address", timeout_s)


def _is_local(url: str | None) -> bool:
    """A store only this machine can reach: a file (journal, sqlite)."""
    return url is None or not url.split(":", 1)[0].lower().startswith(("postgres", "mysql", "http", "https"))


class RayFleet:
    """One worker task per GPU of the cluster (num_gpus=1), or on a CPU-only cluster per CPU share."""

    def __init__(self, address: str, devices: Sequence[str] | None = None) -> None:
        self.address = address
        self.devices = list(devices or [])

    def shape(self, resources: dict[str, float]) -> tuple[int, dict[str, float], str]:
        """(workers, Ray resources per worker, device inside a worker) for the cluster's resources."""
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpus:
            return gpus, {"num_gpus": 1, "num_cpus": max(1, cpus // gpus)}, "cuda:0"
        if cpus < 1:
            raise UserError(f"the Ray cluster at {self.address} offers no CPU or GPU to run trials on")
        from xlstm_tune.runtime.device import worker_devices

        wanted = len([d for item in self.devices for d in worker_devices(item)]) if self.devices else cpus
        n = max(1, min(wanted, cpus))
        return n, {"num_cpus": max(1, cpus // n)}, "cpu"

    def run(self, run: "StudyRun") -> list[WorkerReport]:
        ray = ray_init(self.address)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if len(nodes) > 1 and (_is_local(run.opts.storage) or _is_local(run.tracking_uri)):
                raise UserError(f"the Ray cluster has {len(nodes)} nodes, but the Optuna storage or the MLflow store "
                                f"is a file on this machine: use --storage postgresql://... and "
                                f"--tracking-uri http://HOST:PORT (docs/STUDY.md, A Ray cluster)")
            n, resources, device = self.shape(ray.cluster_resources())
            check_devices(run, device)
            task = ray.remote(max_retries=0, **resources)(ray_worker)
            refs = []
            for i in range(n):
                env = {v: str(int(resources["num_cpus"])) for v in THREAD_VARS}
                if device == "cpu":
                    env["CUDA_VISIBLE_DEVICES"] = ""
                plan = WorkerPlan(f"r{i}", device, env)
                refs.append(task.remote(worker_options(run, plan), {**plan.env, ENV_WORKER: plan.label}, os.getcwd(),
                                        plan.device))
                run.err.write(f"worker {plan.label}: a Ray task with {resources}\n")
            run.err.flush()
            return self._wait(ray, refs, run.err)
        finally:
            ray.shutdown()  # disconnects this driver; the cluster keeps running

    def _wait(self, ray: Any, refs: list[Any], err: TextIO) -> list[WorkerReport]:
        previous = _install_stop_handlers()
        try:
            pending = list(refs)
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        except (KeyboardInterrupt, _Stop):
            err.write(f"stopping {len(refs)} Ray worker(s): their running trials are put back\n")
            for ref in refs:
                ray.cancel(ref)  # KeyboardInterrupt inside the task, which stops its study process
            ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S)
            for ref in refs:
                ray.cancel(ref, force=True)
            raise KeyboardInterrupt from None
        finally:
            _restore_handlers(previous)
        reports = []
        for ref in refs:
            try:
                reports.append(WorkerReport(**ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - a lost node or a killed task
                reports.append(WorkerReport("?", "?", None, last_line=f"{type(exc).__name__}: {str(exc)[:200]}"))
        return reports


def ray_worker(options: dict[str, Any], env: dict[str, str], cwd: str, device: str) -> dict[str, Any]:
    """Body of a Ray worker task: one study worker process on this node, stopped with the task."""
    import socket
    import tempfile

    label = env.get(ENV_WORKER, "ray")
    log_path = Path(tempfile.gettempdir()) / f"xlstm_tune-{label}-{os.getpid()}.log"
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}  # Ray has set CUDA_VISIBLE_DEVICES for num_gpus
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(worker_command(options), env=full_env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd if os.path.isdir(cwd) else None)
        try:
            rc = proc.wait()
        except BaseException:
            stop_group(proc)
            raise
        finally:
            if proc.poll() is None:
                kill_group(proc)
    lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return {"label": label, "device": device, "returncode": rc, "pid": proc.pid,
            "host": socket.gethostname(), "log": str(log_path), "last_line": lines[-1].strip() if lines else ""}


# ---- the worker process itself ---------------------------------------------------------------------
def worker_main(argv: Sequence[str], run_study: Callable[["StudyOptions"], Any] | None = None) -> int:
    """`python -m xlstm_tune.study.fleet OPTIONS_JSON`: one study worker (exit 2 on a UserError)."""
    from xlstm_tune.study.runner import StudyOptions
    from xlstm_tune.study.runner import run_study as default_run
    from xlstm_tune.study.worker import _exit_with_parent

    _exit_with_parent(os.getppid())
    # SIGINT is how the launcher asks this worker to put its trial back and stop (stop_group): honour it
    # even where the launcher runs in the background and this process inherited it ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    try:
        opts = StudyOptions(**json.loads(argv[0]))
        sys.stderr.write(f"xlstm_tune study worker {os.environ.get(ENV_WORKER, '')}: pid {os.getpid()}, device "
                         f"{opts.device or 'auto'}, {torch.get_num_threads()} math thread(s), "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(all)')}\n")
        sys.stderr.flush()
        (run_study or default_run)(opts)
    except UserError as exc:
        sys.stderr.write(f"xlstm_tune study worker: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("xlstm_tune study worker: interrupted; its running trial was put back\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1:]))
