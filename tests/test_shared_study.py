"""One study, many processes: `python -m xlstm_tune study` workers on one storage (a real PostgreSQL
server, and a journal file in a shared --out-dir), one of them SIGKILLed in the middle of a trial.

Checked: the study ends with exactly n_trials COMPLETE trials; no configuration is measured twice; the
killed worker's trial is failed once, re-queued once and measured by a survivor (nothing lost); every
finished trial has exactly one MLflow child run; the surviving workers exit 0 without a traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")


from xlstm_tune.study.liveness import OWNER_ATTR  # noqa: E402
from xlstm_tune.study.storage import sqlalchemy_url  # noqa: E402
from xlstm_tune.tracking.mlflow_log import StudyTracker  # noqa: E402

pytestmark = pytest.mark.slow
N_TRIALS = 5
WORKERS = 3
SPEC = """
[study]
name = "shared"
n_trials = 5
sampler = "random"
seed = 7
# trials 0-3: the default and three distinct configurations, so trial 2 (the delayed one) is measured
enqueue = [{backend = "native", chunk_size = 16}, {backend = "native", chunk_size = 32},
           {backend = "queued", chunk_size = 16}]
objectives = ["prefill_tok_s"]
[model]
name = "tiny"
device = "cpu"
compile = false
[workload]
context_lens = [32]
new_tokens = 4
[bench]
repeats = 2
[fidelity]
prompt_len = 16
decode_steps = 2
[confirm]
rounds = 1
top_k = 1
[space]
backend = ["native", "queued"]
chunk_size = [16, 32]
t_inner = [1, 4]
heads_per_band = [4]
workers = [1, 4]
decode_mode = ["eager"]
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_", "MLFLOW_"))}
    env.update(PYTHONUNBUFFERED="1", XLSTM_TUNE_INJECT_FAULT="2:delay")  # whoever runs trial 2 takes 20 s
    return env



def _start(cwd: Path, i: int, storage: str | None, tracking: str | None, out_dir: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "xlstm_tune", "study", "--experiment", str(cwd / "shared.toml"),
            "--out-dir", out_dir, "--trial-timeout", "120", "--no-progress",
            "--heartbeat-interval", "1", "--grace-period", "5",
            "--no-early-stopping"]  # every trial measured to the end: the test counts COMPLETE trials
    if storage:
        args += ["--storage", storage]
    if tracking:
        args += ["--tracking-uri", tracking]
    log = open(cwd / f"worker{i}.err", "w")
    return subprocess.Popen(args, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _owner_pid(storage) -> int | None:
    """The pid of the process that runs trial 2, once it runs."""
    try:
        st = optuna.load_study(study_name="shared", storage=storage)
    except KeyError:
        return None
    for t in st.get_trials(deepcopy=False):
        if t.number == 2 and t.state.name == "RUNNING" and t.system_attrs.get(OWNER_ATTR):
            return int(t.system_attrs[OWNER_ATTR].split(":")[1])
    return None


def _run_shared(cwd: Path, storage_url: str | None, tracking: str | None, out_dirs: list[str], storage) -> tuple:
    (cwd / "shared.toml").write_text(SPEC)
    procs = [_start(cwd, i, storage_url, tracking, out_dirs[i]) for i in range(WORKERS)]
    try:
        deadline = time.monotonic() + 420
        victim = None
        while time.monotonic() < deadline and victim is None:
            assert all(p.poll() is None for p in procs), [(cwd / f"worker{i}.err").read_text()[-2000:] for i in range(WORKERS)]
            pid = _owner_pid(storage)
            victim = next((p for p in procs if p.pid == pid), None)
            time.sleep(0.5)
        assert victim is not None, "trial 2 was never seen RUNNING"
        os.killpg(victim.pid, signal.SIGKILL)  # the study process and its trial worker, mid-trial
        victim.wait(10)
        survivors = [p for p in procs if p is not victim]
        for p in survivors:
            p.wait(timeout=max(10.0, deadline + 300 - time.monotonic()))
    finally:
        _kill_all(procs)
    errs = [(cwd / f"worker{i}.err").read_text() for i in range(WORKERS)]
    for p, err in zip(procs, errs):
        if p is not victim:
            assert p.returncode == 0, err[-3000:]
            assert "Traceback" not in err, err[-3000:]
    return victim, procs


def _check_study(storage, tracking_uri: str) -> None:
    from mlflow import MlflowClient

    st = optuna.load_study(study_name="shared", storage=storage)
    trials = st.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == N_TRIALS, states
    assert "RUNNING" not in states and "WAITING" not in states, states
    killed = next(t for t in trials if t.number == 2)
    assert killed.state.name == "FAIL"
    retries = [t for t in trials if 2 in (t.system_attrs.get("retry_history") or [])]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE", [t.number for t in retries]  # re-queued once
    assert retries[0].params == killed.params  # nothing lost: its configuration was measured
    measured = [t.user_attrs["record"] for t in trials if t.state.name == "COMPLETE"
                and t.user_attrs["record"].get("duplicate_of") is None]
    keys = [r["key"] for r in measured]
    assert len(keys) == len(set(keys)), keys  # no configuration measured twice
    owners = {t.system_attrs[OWNER_ATTR] for t in trials}
    assert len(owners) >= 2  # the work was shared
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("xlstm_tune/shared")
    children: dict[int, list] = {}
    for r in client.search_runs([exp.experiment_id], max_results=1000):
        if r.data.tags.get("xlstm_tune.role") == "trial" and r.data.tags.get("xlstm_tune.superseded_by_retry") != "true":
            children.setdefault(int(r.data.tags["xlstm_tune.trial"]), []).append(r)
    finished = sorted(t.number for t in trials if t.state.is_finished())
    assert sorted(children) == finished
    assert all(len(v) == 1 for v in children.values()), {n: len(v) for n, v in children.items()}
    assert children[2][0].data.tags["failure_reason"] == "interrupted"


def test_postgresql_workers_share_one_study(tmp_path: Path, pg_url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(sqlalchemy_url(pg_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sqlalchemy.text("CREATE DATABASE mlflow"))
    engine.dispose()
    tracking = sqlalchemy_url(pg_url.rsplit("/", 1)[0] + "/mlflow")
    StudyTracker(tracking, "xlstm_tune/shared").get_or_create_experiment()  # the schema, made once
    storage = optuna.storages.RDBStorage(sqlalchemy_url(pg_url))
    _run_shared(tmp_path, pg_url, tracking, [f"out{i}" for i in range(WORKERS)], storage)
    _check_study(storage, tracking)


def test_journal_workers_share_one_out_dir(tmp_path: Path) -> None:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out = tmp_path / "out"
    tracking = f"sqlite:///{out.resolve()}/mlflow.db"
    out.mkdir()
    StudyTracker(tracking, "xlstm_tune/shared").get_or_create_experiment()
    journal = out / "optuna.journal"
    journal.touch()
    storage = JournalStorage(JournalFileBackend(str(journal)))
    _run_shared(tmp_path, None, None, ["out"] * WORKERS, storage)
    _check_study(storage, tracking)
    import json

    lines = [json.loads(x) for x in (out / "studies" / "shared" / "trials.jsonl").read_text().splitlines()]
    st = optuna.load_study(study_name="shared", storage=storage)
    assert [r["number"] for r in lines] == sorted(t.number for t in st.trials if t.state.is_finished())
