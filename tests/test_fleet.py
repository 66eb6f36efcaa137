"""Many trial workers on one study: `study --devices cpu:N` on this machine, `--ray-address` on a local Ray cluster.

The studies answer their trials from a recorded study (replay) so that the tests measure the fleet, not
the model; the SIGTERM test runs the real tiny model so that trials are really in flight. Every process
a test starts (workers, the Ray cluster) is killed at teardown, pass or fail; the Ray cluster has its own
temporary folder, ports and token and is stopped by killing exactly its own processes.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

from conftest import child_env  # noqa: E402
from test_study_replay import make_source  # noqa: E402

from xlstm_tune.errors import DeviceUnavailableError, UserError  # noqa: E402
from xlstm_tune.runtime.device import isolated_device, worker_devices  # noqa: E402
from xlstm_tune.study.fleet import RayFleet, plan_local  # noqa: E402
from xlstm_tune.tracking.mlflow_log import StudyTracker  # noqa: E402



def _env(**extra: str) -> dict[str, str]:
    env = child_env()
    env.pop("XLSTM_TUNE_INJECT_FAULT", None)
    return {**env, **extra}


def _study(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_tune", "study", "--no-progress", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        _kill_tree(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _kill_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _trials(storage: Path, name: str) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(storage)))).get_trials()


def _worker_pids(stderr: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^worker (\S+): pid (\d+)", stderr, re.M)}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "src")


# ---- devices ----------------------------------------------------------------------------------------
def test_device_lists() -> None:
    assert worker_devices("cpu:3") == ["cpu", "cpu", "cpu"]
    assert worker_devices("cpu, cpu") == ["cpu", "cpu"]
    assert isolated_device("cpu") == ("cpu", {"CUDA_VISIBLE_DEVICES": ""})  # a CPU worker sees no GPU
    for bad, word in (("cpu:0", "cpu:N"), ("", "names no device"), ("auto", "explicit"), ("tpu:1", "unknown device")):
        with pytest.raises(UserError, match=word) as exc:
            worker_devices(bad)
        assert "\n" not in str(exc.value)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="cuda"):
            worker_devices("cuda:0,cuda:1")


def test_cpu_workers_split_the_cores() -> None:
    plans = plan_local(["cpu"] * 3, cores=8)
    assert [p.label for p in plans] == ["w0-cpu", "w1-cpu", "w2-cpu"]
    assert {p.env["OMP_NUM_THREADS"] for p in plans} == {"2"} and all(p.device == "cpu" for p in plans)
    assert plan_local(["cpu"] * 4, cores=2)[0].env["OMP_NUM_THREADS"] == "1"  # never 0


def test_ray_shape_one_worker_per_gpu_else_per_cpu_share() -> None:
    assert RayFleet("x").shape({"GPU": 4.0, "CPU": 32.0}) == (4, {"num_gpus": 1, "num_cpus": 8}, "cuda:0")
    assert RayFleet("x").shape({"CPU": 2.0}) == (2, {"num_cpus": 1}, "cpu")
    assert RayFleet("x", ["cpu:1"]).shape({"CPU": 8.0}) == (1, {"num_cpus": 8}, "cpu")
    with pytest.raises(UserError, match="no CPU or GPU"):
        RayFleet("x").shape({"memory": 1.0})


def test_bad_devices_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    res = _study(["--devices", "cpu:0", "--out-dir", str(tmp_path / "out")], _env(), timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("xlstm_tune study: error: --devices entry 'cpu:0'")
    assert not (tmp_path / "out").exists()


# ---- N CPU workers on this machine -----------------------------------------------------------------
def test_cpu_workers_share_one_study(source: Path, tmp_path: Path) -> None:
    out, n_trials, n_workers = tmp_path / "out", 6, 3
    res = _study(["--replay", str(source), "--out-dir", str(out), "--study-name", "fl", "--n-trials", str(n_trials),
                  "--devices", f"cpu:{n_workers}"], _env())
    assert res.returncode == 0, res.stderr[-3000:]
    pids = _worker_pids(res.stderr)
    assert sorted(pids) == ["w0-cpu", "w1-cpu", "w2-cpu"]
    assert all(_gone(p) for p in pids.values())

    trials = _trials(out / "optuna.journal", "fl")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # n_trials is the study's total: workers stop once it is reached (each finishes the trial it holds).
    assert n_trials <= len(complete) <= n_trials + n_workers - 1
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    records = [t.user_attrs["record"] for t in trials]
    # The workers ran the trials (the launcher ran none): their labels and pids are in the records.
    assert {r["fleet_worker"] for r in records} <= set(pids)
    assert {r["study_pid"] for r in records} <= set(pids.values())
    assert len({r["key"] for r in records if r["state"] == "COMPLETE" and r.get("duplicate_of") is None}) == \
        len([r for r in records if r["state"] == "COMPLETE" and r.get("duplicate_of") is None])

    # Each worker saw only its share of the cores.
    cores = len(os.sched_getaffinity(0))
    for label in pids:
        log = (out / "studies" / "fl" / "fleet" / f"{label}.log").read_text()
        assert f"{max(1, cores // n_workers)} math thread(s)" in log, log[-500:]

    # One combined summary, from the launcher, after the workers; one best.json; one MLflow child per trial.
    assert res.stdout.count("Best configuration per context length") == 1
    for label in pids:
        assert f"worker {label} (cpu, pid {pids[label]}): finished" in res.stdout
    from xlstm_tune.tracking.best_export import check_best

    check_best(out / "studies" / "fl" / "best.json")  # written once, by the launcher, and valid
    tr = StudyTracker(f"sqlite:///{out / 'mlflow.db'}", "xlstm_tune/fl")
    (parent,) = tr.client.search_runs([tr.get_or_create_experiment()],
                                      filter_string="tags.`xlstm_tune.role` = 'parent'")
    assert parent.info.status == "FINISHED"  # ended once, by the launcher
    tr.start_parent("fl")
    runs = tr.find_trial_runs()
    assert sorted(runs) == sorted(t.number for t in trials)
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs.values())
    children = tr.client.search_runs([tr.experiment_id], filter_string="tags.`xlstm_tune.role` = 'trial'")
    assert len(children) == len(trials)  # none logged twice by two workers
    lines = (out / "studies" / "fl" / "trials.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["number"] for x in lines) == sorted(t.number for t in trials)


@pytest.mark.slow
def test_sigterm_reaches_every_worker_and_their_trials_are_put_back(tmp_path: Path) -> None:
    """Real trials (the tiny model) held in flight by the `delay` fault; SIGTERM to the launcher only."""
    out = tmp_path / "out"
    env = _env(XLSTM_TUNE_INJECT_FAULT="0:delay,1:delay,2:delay,3:delay")
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_tune", "study", "--no-progress", "--out-dir", str(out),
                             "--study-name", "sig", "--n-trials", "4", "--devices", "cpu:2", "--prefill-len", "16",
                             "--new-tokens", "4", "--repeats", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        running: list = []
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "optuna.journal").is_file():
                try:
                    running = [t for t in _trials(out / "optuna.journal", "sig") if t.state.name == "RUNNING"]
                except KeyError:
                    running = []
                if len(running) == 2:
                    break
            time.sleep(0.5)
        if len(running) != 2:
            proc.kill()
            raise AssertionError(f"both workers should be inside a trial; the study said: {proc.communicate()[1][-3000:]}")
        group = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=200)
    finally:
        _kill_tree(proc.pid)
    assert proc.returncode == 130, err[-2000:]
    assert "stopping 2 worker(s)" in err and "Traceback" not in err
    assert all(_gone(p) for p in group)  # workers and their trial processes
    trials = _trials(out / "optuna.journal", "sig")
    assert not [t for t in trials if t.state.name == "RUNNING"]
    held = {t.number for t in running}
    for t in trials:
        if t.number in held:
            assert t.state.name == "FAIL" and t.user_attrs["record"]["failure_reason"] == "interrupted"
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert {t.user_attrs.get("requeued_from") for t in waiting} >= held  # put back for the next run


# ---- a local Ray cluster -------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """Exactly this cluster's processes: those whose command line names its private temp folder."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return mine


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    temp = Path(tmp_path_factory.mktemp("ray", numbered=True))
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = _env(RAY_TMPDIR=str(temp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               RAY_USAGE_STATS_ENABLED="0")
    port, *others = _free_ports(8)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--node-ip-address", "127.0.0.1",
           "--port", str(port), "--temp-dir", str(temp), "--num-cpus", "2", "--include-dashboard", "false",
           "--dashboard-port", str(others[0]), "--dashboard-agent-listen-port", str(others[1]),
           "--dashboard-agent-grpc-port", str(others[2]), "--metrics-export-port", str(others[3]),
           "--runtime-env-agent-port", str(others[4]), "--node-manager-port", str(others[5]),
           "--object-manager-port", str(others[6]), "--disable-usage-stats"]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
        yield {"address": f"127.0.0.1:{port}", "env": env, "temp": temp}
    finally:
        procs = _cluster_processes(temp)
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        assert not _cluster_processes(temp)


def test_study_trials_run_on_ray_workers(ray_cluster: dict, source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _study(["--replay", str(source), "--out-dir", str(out), "--study-name", "ray", "--n-trials", "4",
                  "--ray-address", ray_cluster["address"]], ray_cluster["env"])
    assert res.returncode == 0, res.stderr[-3000:]
    notes = re.findall(r"worker (r\d) \(cpu on (\S+), pid (\d+)\): finished", res.stdout)
    assert sorted(n[0] for n in notes) == ["r0", "r1"]  # one per CPU of the 2-CPU cluster
    ray_pids = {int(n[2]) for n in notes}
    trials = _trials(out / "optuna.journal", "ray")
    assert len([t for t in trials if t.state.name == "COMPLETE"]) >= 4
    records = [t.user_attrs["record"] for t in trials]
    # Ray's workers ran them: the study processes the Ray tasks started, on the cluster's node.
    assert {r["study_pid"] for r in records} <= ray_pids
    assert {r["fleet_worker"] for r in records} <= {"r0", "r1"}
    assert {r["study_host"] for r in records} == {n[1] for n in notes}
    for pid in ray_pids:
        assert _gone(pid)
    tr = StudyTracker(f"sqlite:///{out / 'mlflow.db'}", "xlstm_tune/ray")
    tr.start_parent("ray")
    assert sorted(tr.find_trial_runs()) == sorted(t.number for t in trials)
    assert res.stdout.count("Best configuration per context length") == 1


def test_ray_without_a_cluster_is_one_line(source: Path, tmp_path: Path) -> None:
    # In a process of its own: Ray's native client may still be retrying when the deadline passes.
    (port,) = _free_ports(1)
    res = _study(["--replay", str(source), "--out-dir", str(tmp_path / "out"), "--study-name", "none",
                  "--ray-address", f"127.0.0.1:{port}"], _env(RAY_TMPDIR=str(tmp_path)), timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"xlstm_tune study: error: Ray could not join the cluster at 127.0.0.1:{port}")
    assert not (tmp_path / "out").exists()  # refused before the study was opened


def test_ray_cluster_without_its_token_is_one_line(ray_cluster: dict, source: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in ray_cluster["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    res = _study(["--replay", str(source), "--out-dir", str(tmp_path / "out"), "--study-name", "tok", "--n-trials", "2",
                  "--ray-address", ray_cluster["address"]], env, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("xlstm_tune study: error: Ray could not join the cluster") and "RAY_AUTH_MODE=token" in last
    assert not (tmp_path / "out").exists()  # refused before the study was opened
