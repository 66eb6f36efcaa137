"""End to end: `python -m xlstm_tune study` as a subprocess on `tiny`/CPU, then everything it left behind.

Covers: a full study (Optuna storage, MLflow runs through MlflowClient, study files, best.json, export,
applying best.json), re-running a finished study, SIGKILL mid-trial and resume, injected failures of every
kind, a fidelity-infeasible fastest configuration, bad input (one line, exit 2, results untouched), and
the `ui` / `dashboard` servers. Settings are tiny (short prompts, few trials) to keep this to minutes.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")
pytest.importorskip("torch")

from mlflow import MlflowClient  # noqa: E402

from xlstm_tune.cli.main import main  # noqa: E402
from xlstm_tune.runtime.options import KNOBS, RuntimeOptions  # noqa: E402
from xlstm_tune.tracking.best_export import check_best  # noqa: E402
from xlstm_tune.tracking.study_files import SEED_COLUMNS, StudyFiles  # noqa: E402

pytestmark = pytest.mark.slow
SMALL = ["--prefill-len", "32,64", "--new-tokens", "8", "--repeats", "2", "--trial-timeout", "60", "--no-progress",
         "--no-early-stopping"]  # these tests count COMPLETE trials; early stopping has tests/test_pruning.py


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_", "MLFLOW_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xlstm_tune", *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _journal(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / "optuna.journal")))


def _client(out: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{out.resolve()}/mlflow.db")


def _runs(out: Path, name: str) -> tuple:
    client = _client(out)
    exp = client.get_experiment_by_name(f"xlstm_tune/{name}")
    assert exp is not None, f"no MLflow experiment for {name}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("xlstm_tune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("xlstm_tune.role") == "trial"
                and r.data.tags.get("xlstm_tune.superseded_by_retry") != "true"]
    return client, parents, children


def check_consistent(out: Path, name: str) -> tuple[list, list]:
    """Optuna, trials.jsonl, summary.csv and MLflow hold the same finished trials, each exactly once."""
    st = optuna.load_study(study_name=name, storage=_journal(out))
    finished = sorted((t for t in st.trials if t.state.is_finished()), key=lambda t: t.number)
    assert not [t for t in st.trials if t.state.name == "RUNNING"]
    files = StudyFiles.for_study(out, name)
    lines = [json.loads(x) for x in files.trials_path.read_text().splitlines() if x.strip()]
    numbers = [r["number"] for r in lines]
    assert len(numbers) == len(set(numbers)), "duplicate trial lines"
    assert sorted(numbers) == [t.number for t in finished]
    for t, r in zip(finished, sorted(lines, key=lambda r: r["number"])):
        assert r["state"] == t.state.name
    rows = list(csv.DictReader(files.summary_path.open()))
    assert sorted(int(r["number"]) for r in rows) == [t.number for t in finished]
    _, parents, children = _runs(out, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_trial = {}
    for r in children:
        by_trial.setdefault(int(r.data.tags["xlstm_tune.trial"]), []).append(r)
    assert sorted(by_trial) == [t.number for t in finished]
    assert all(len(v) == 1 for v in by_trial.values()), "more than one live MLflow run for a trial"
    for t in finished:
        run = by_trial[t.number][0]
        assert run.info.status == ("FAILED" if t.state.name == "FAIL" else "FINISHED")
        assert run.data.tags["trial_state"] == t.state.name
    return finished, lines


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---- a finished study, shared by the tests that only read it ---------------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> dict:
    cwd = tmp_path_factory.mktemp("e2e")
    proc = cli(cwd, "study", "--out-dir", "out", "--study-name", "e2e", "--n-trials", "5", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"cwd": cwd, "out": cwd / "out", "proc": proc}


def test_full_study_end_to_end(finished: dict) -> None:
    cwd, out, proc = finished["cwd"], finished["out"], finished["proc"]
    # stdout: the table, the speed-ups, every result file
    for needle in ("Best configuration per context length", "vs default", "trials.jsonl", "summary.csv",
                   "best.json", "optuna.journal", "mlflow.db", "python -m xlstm_tune run --best"):
        assert needle in proc.stdout, needle
    # Optuna storage
    st = optuna.load_study(study_name="e2e", storage=_journal(out))
    complete = [t for t in st.trials if t.state.name == "COMPLETE"]
    # On a CPU the quickstart searches decode_mode = [eager] only, and nothing else moves decode: decode is
    # recorded, prefill optimised
    assert len(complete) == 5 and len(st.directions) == 1
    assert "decode_tok_s is recorded but not optimised" in proc.stdout
    for t in complete:
        assert "record" in t.user_attrs and t.user_attrs["prefill_tok_s"] > 0
        assert "fidelity" in t.constraints and t.constraints["fidelity"] <= 0
    assert st.trials[0].user_attrs.get("baseline") is True  # the default configuration goes first
    # MLflow: one experiment, a parent and a child per trial with knobs, metrics, tags and artifacts
    finished_trials, lines = check_consistent(out, "e2e")
    client, parents, children = _runs(out, "e2e")
    parent = parents[0]
    assert parent.data.params["study.n_trials"] == "5" and "best_prefill_tok_s" in parent.data.metrics
    parent_arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"run_meta.json", "trials.jsonl", "summary.csv", "best.json"} <= parent_arts
    child = next(r for r in children if r.data.tags["xlstm_tune.trial"] == "1")
    assert set(KNOBS) <= set(child.data.params)
    for m in ("prefill_tok_s", "prefill_tok_s_ctx32", "prefill_tok_s_ctx64_p80", "decode_tok_s", "decode_tok_s_p20",
              "decode_tok_s_cv", "compile_s", "fidelity_rel_err", "fidelity_greedy_agreement"):
        assert m in child.data.metrics, m
    for tag in ("trial_state", "device", "torch_version", "failure_reason"):
        assert tag in child.data.tags, tag
    assert child.data.tags["decode_path"] == child.data.params["decode_mode"]  # CPU: eager or compiled, as asked
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"trial_1.txt", "trial_1_decode.csv"} <= arts
    # quality: every trial's continuation is scored and judged, and the scores reach MLflow
    for m in ("distinct_1", "distinct_2", "repetition_rate", "perplexity", "judge_overall", "fidelity_kl_mean"):
        assert m in child.data.metrics, m
    assert child.data.metrics["perplexity"] > 1.0 and 1 <= child.data.metrics["judge_overall"] <= 10
    # plots and report.md are written at the end of the study and attached to the parent run
    study_dir = out / "studies" / "e2e"
    report = (study_dir / "report.md").read_text()
    assert "## Fidelity" in report and "perplexity" in report
    pngs = sorted((study_dir / "plots").glob("*.png"))
    assert {"prefill_vs_decode.png", "history_decode_tok_s.png"} <= {p.name for p in pngs}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"plots/{png.name}" in report  # the report embeds every plot it drew
    assert {"report.md", "plots"} <= parent_arts
    # study files
    files = StudyFiles.for_study(out, "e2e")
    meta = json.loads(files.run_meta_path.read_text())
    assert meta["spec"]["model"]["name"] == "tiny" and meta["device_summary"]["device_type"] == "cpu"
    assert meta["provenance"]["torch_version"] and meta["model_info"]["num_heads"] == 4
    header = files.summary_path.read_text().splitlines()[0].split(",")
    assert header[: len(SEED_COLUMNS)] == list(SEED_COLUMNS)
    assert all(k in lines[0] for k in ("prefill_tok_s_ctx32", "decode_tok_s_p80", "fidelity_rel_err", "t_inner"))
    stats = (files.outputs_dir / "trial_1_decode.csv").read_text().splitlines()
    assert stats[0] == "step,dt_ms,cum_ms,inst_tok_s,avg_tok_s" and len(stats) == 8
    # best.json: validated, one entry per context length, confirmed against the default
    best = check_best(files.best_path)
    assert [c["context_len"] for c in best["contexts"]] == [32, 64]
    for c in best["contexts"]:
        assert c["confirmed"] and c["fidelity"]["passed"] and c["metrics"]["speedup_prefill"] > 0
        assert c["env"]["XLSTM_CHUNK_SIZE"] == str(c["knobs"]["chunk_size"])
    assert best["provenance"]["study_name"] == "e2e" and best["provenance"]["model_config_hash"]
    assert RuntimeOptions.from_best(files.best_path, 32).knobs() == best["contexts"][0]["knobs"]
    # export and check through the CLI; the exported file drives `bench --best`
    assert cli(cwd, "export", "--study", "e2e", "--out-dir", "out", "--context-len", "64", "--out", "b64.json").returncode == 0
    one = check_best(cwd / "b64.json")
    assert [c["context_len"] for c in one["contexts"]] == [64]
    ok = cli(cwd, "export", "--check", "b64.json")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    # best.json carries the settings the study measured with; `bench --best` applies them (no --no-compile)
    assert best["runtime"]["compile"] is False and best["runtime"]["threads"] >= 1
    assert all(r["runtime"]["threads"] == best["runtime"]["threads"] for r in lines if r.get("runtime"))
    bench = cli(cwd, "bench", "--best", "b64.json", "--prefill-len", "64", "--new-tokens", "4",
                "--repeats", "2", "--json")
    assert bench.returncode == 0, bench.stderr
    result = json.loads(bench.stdout)
    assert {k: v for k, v in result["knobs"].items() if k in KNOBS} == one["contexts"][0]["knobs"]
    assert result["knobs"]["compile"] is False and result["runtime"]["threads"] == best["runtime"]["threads"]
    assert result["prefill"][0]["stats"]["compiled_calls"] == 0  # counted where the kernels ran


def test_rerun_of_a_finished_study_does_no_new_work(finished: dict) -> None:
    out = finished["out"]
    before = len(optuna.load_study(study_name="e2e", storage=_journal(out)).trials)
    best_before = (out / "studies" / "e2e" / "best.json").read_bytes()
    logs_before = sorted((out / "studies" / "e2e" / "workers").glob("*.log"))
    outputs = out / "studies" / "e2e" / "outputs"
    outputs_before = {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()}
    proc = cli(finished["cwd"], "study", "--out-dir", "out", "--study-name", "e2e", "--n-trials", "5", *SMALL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0 new trial(s)" in proc.stdout
    assert len(optuna.load_study(study_name="e2e", storage=_journal(out)).trials) == before
    assert (out / "studies" / "e2e" / "best.json").read_bytes() == best_before
    assert sorted((out / "studies" / "e2e" / "workers").glob("*.log")) == logs_before  # no worker was started
    # nothing was measured: no trial or confirmation output was written or rewritten
    assert {p.name: p.stat().st_mtime_ns for p in outputs.iterdir()} == outputs_before


def _worker_pid(out: Path, name: str) -> int | None:
    logs = sorted((out / "studies" / name / "workers").glob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    first = logs[-1].read_text(errors="replace").splitlines()[:1]
    if not first or "worker" not in first[0]:
        return None
    return int(first[0].split("worker", 1)[1].split("]")[0])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_sigkill_mid_trial_then_resume(tmp_path: Path) -> None:
    args = ["study", "--out-dir", "out", "--study-name", "kill", "--n-trials", "4", "--sampler", "random", *SMALL]
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_tune", *args], cwd=tmp_path,
                            env=_env(XLSTM_TUNE_INJECT_FAULT="2:delay"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        running = None
        while time.monotonic() < deadline:
            time.sleep(0.5)
            trials_file = out / "studies" / "kill" / "trials.jsonl"
            if trials_file.is_file() and len(trials_file.read_text().splitlines()) >= 2:
                try:
                    st = optuna.load_study(study_name="kill", storage=_journal(out))
                    running = [t for t in st.trials if t.state.name == "RUNNING"]
                except Exception:
                    running = None
                if running and running[0].number == 2:
                    break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert running and running[0].number == 2, "trial 2 never seen RUNNING"
        time.sleep(1.0)  # inside the delayed trial
        worker = _worker_pid(out, "kill")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert worker is not None
    t0 = time.monotonic()
    while _alive(worker) and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert not _alive(worker), "the worker outlived the killed study"
    lines_before = (out / "studies" / "kill" / "trials.jsonl").read_text().splitlines()
    assert len(lines_before) == 2
    # the same command again, without the fault
    again = cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    finished_trials, lines = check_consistent(out, "kill")
    recs = {r["number"]: r for r in lines}
    assert recs[2]["state"] == "FAIL" and recs[2]["failure_reason"] == "interrupted"
    assert sum(1 for r in lines if r["state"] == "COMPLETE") == 4
    requeued = [r for r in lines if r.get("requeued_from") == 2]
    assert len(requeued) == 1 and requeued[0]["state"] == "COMPLETE"
    assert requeued[0]["params"] == recs[2]["params"]
    assert [json.loads(x)["key"] for x in lines_before] == [recs[0]["key"], recs[1]["key"]]  # kept, not re-run
    assert check_best(out / "studies" / "kill" / "best.json")


def test_injected_failures_are_classified_and_survived(tmp_path: Path) -> None:
    faults = "1:crash,2:compile_error,3:memory_abort,4:timeout,5:oom"
    proc = cli(tmp_path, "study", "--out-dir", "out", "--study-name", "faults", "--n-trials", "3", "--sampler",
               "random", *SMALL[:6], "--trial-timeout", "10", "--no-progress", "--no-early-stopping",
               env=_env(XLSTM_TUNE_INJECT_FAULT=faults))
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished_trials, lines = check_consistent(tmp_path / "out", "faults")
    recs = {r["number"]: r for r in lines}
    expect = {1: "crash", 2: "compile_error", 3: "memory_abort", 4: "timeout", 5: "oom"}
    for n, reason in expect.items():
        assert recs[n]["state"] == "FAIL" and recs[n]["failure_reason"] == reason, recs[n]
        assert recs[n]["error"] and recs[n].get("traceback"), recs[n]
    assert "SIGABRT" in recs[1]["error"]
    assert "BackendCompilerFailed" in recs[2]["error_type"]
    assert "MemoryAbort" in recs[3]["error_type"]
    assert sum(1 for r in lines if r["state"] == "COMPLETE") == 3
    _, _, children = _runs(tmp_path / "out", "faults")
    tags = {int(r.data.tags["xlstm_tune.trial"]): r.data.tags for r in children}
    assert tags[4]["failure_reason"] == "timeout" and tags[1]["trial_state"] == "FAIL"
    client = _client(tmp_path / "out")
    crash_run = next(r for r in children if r.data.tags["xlstm_tune.trial"] == "1")
    assert "trial_1_error.txt" in {a.path for a in client.list_artifacts(crash_run.info.run_id)}
    assert "crash 1" in proc.stdout and "timeout 1" in proc.stdout


def test_fidelity_failure_is_infeasible_and_never_best(tmp_path: Path) -> None:
    spec = tmp_path / "strict.toml"
    spec.write_text(
        '[study]\nname = "strict"\nn_trials = 4\nsampler = "grid"\nobjectives = ["prefill_tok_s"]\n'
        '[model]\nname = "tiny"\ndevice = "cpu"\ncompile = false\n'
        '[workload]\ncontext_lens = [64]\nnew_tokens = 4\n[bench]\nrepeats = 2\n'
        '[fidelity]\nrel_tol = 1e-12\nprompt_len = 48\ndecode_steps = 2\n[confirm]\nrounds = 1\n'
        '[space]\nbackend = ["native", "queued"]\nchunk_size = [16, 32]\nt_inner = [1]\nheads_per_band = [4]\n'
        'workers = [1]\n')
    # every trial measured to the end: a screen taken while other jobs load the CPU must not prune native
    proc = cli(tmp_path, "study", "--experiment", str(spec), "--out-dir", "out", "--no-progress",
               "--no-early-stopping")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, lines = check_consistent(tmp_path / "out", "strict")
    native = [r for r in lines if r["backend"] == "native"]
    queued = [r for r in lines if r["backend"] == "queued" and r["state"] == "COMPLETE"]
    assert native and all(not r["feasible"] and r["failure_reason"] == "fidelity" for r in native)
    assert queued and all(r["feasible"] for r in queued)  # the step path is the reference's own math
    # measured (they have speeds, whatever the machine's load made of them), yet never best
    assert all(r["state"] == "COMPLETE" and r["prefill_tok_s"] > 0 for r in native)
    best = check_best(tmp_path / "out" / "studies" / "strict" / "best.json")
    assert best["contexts"][0]["knobs"]["backend"] == "queued"
    st = optuna.load_study(study_name="strict", storage=_journal(tmp_path / "out"))
    assert all(t.constraints["fidelity"] > 0 for t in st.trials if t.params.get("backend") == "native")


# ---- bad input: one line, exit code 2, nothing touched -----------------------------------------------------
def test_bad_input_one_line_exit_2_and_results_untouched(finished: dict, tmp_path: Path, capsys) -> None:
    out = finished["out"]
    before = _tree_digest(out)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('[study]\nname = "e2e"\n[space]\nchunk_sizes = [16]\n')
    empty = tmp_path / "empty.toml"
    empty.write_text('[study]\nname = "e2e"\n[space]\nchunk_size = {low = 64, high = 16}\n')
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"schema": "xlstm_tune.best/1", "contexts": [')
    base = ["study", "--out-dir", str(out), "--study-name", "e2e", *SMALL]
    cases = [
        (base + ["--experiment", str(unknown)], "unknown knob 'chunk_sizes'"),
        (base + ["--experiment", str(empty)], "range is empty"),
        (base + ["--sampler", "annealing"], "unknown sampler 'annealing'"),
        (base + ["--storage", f"sqlite:///{tmp_path}/no/such/dir/db.sqlite"], "cannot open --storage"),
        (base + ["--storage", "postgresql://nobody@127.0.0.1:1/db"], "--storage"),
        (base + ["--storage", "ftp://example.org/x"], "unsupported scheme"),
        (base + ["--tracking-uri", "http://127.0.0.1:1"], "unreachable"),
        (base + ["--tracking-uri", "./mlruns"], "file-store path"),
        (base + ["--device", "cuda"], "cuda"),
        (base + ["--chunk-size", "0"], "chunk_size must be >= 1"),
        (base + ["--backend", "turbo"], "unknown backend"),
        (base + ["--prompt-file", str(tmp_path / "missing.txt")], "--prompt-file"),
        (base + ["--prefill-len", "64", "--n-trials", "9"], "different settings"),
        (["export", "--check", str(corrupt)], "not valid JSON"),
        (["bench", "--best", str(corrupt)], "not valid JSON"),
        (["export", "--study", "e2e", "--out-dir", str(out), "--context-len", "7", "--out", str(tmp_path / "x.json")],
         "was not measured"),
    ]
    for argv, needle in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (argv, err)
        assert len(err.splitlines()) == 1 and needle in err, (argv, err)
    # and once for real, as a process: exit status 2 and a single stderr line
    proc = cli(finished["cwd"], "study", "--out-dir", "out", *base[3:], "--sampler", "bogus")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert _tree_digest(out) == before
    assert not (tmp_path / "x.json").exists()


# ---- servers ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cwd: Path, args: list[str], url: str, timeout: float) -> str:
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_tune", *args], cwd=cwd, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.read().decode()
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"{url} did not answer in {timeout} s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_dashboard_and_ui_serve_the_study(finished: dict, capsys) -> None:
    cwd = finished["cwd"]
    assert main(["ui", "--out-dir", str(finished["out"]), "--print-command"]) == 0
    cmd = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri sqlite:///" in cmd and "--host 127.0.0.1" in cmd
    assert main(["dashboard", "--out-dir", str(finished["out"]), "--print-command"]) == 0
    assert "optuna.journal --host 127.0.0.1" in capsys.readouterr().out
    port = _free_port()
    body = _serve(cwd, ["dashboard", "--out-dir", "out", "--port", str(port)], f"http://127.0.0.1:{port}/api/studies", 60)
    assert '"e2e"' in body
    port = _free_port()
    body = _serve(cwd, ["ui", "--out-dir", "out", "--port", str(port)],
                  f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=xlstm_tune/e2e", 120)
    assert "xlstm_tune/e2e" in body


# ---- [study] enqueue ----------------------------------------------------------------------------------------
def test_enqueued_configurations_run_right_after_the_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "exp.toml"
    spec.write_text('[study]\nname = "enq"\nn_trials = 3\nenqueue = [{backend = "native", chunk_size = 64, decode_mode = "eager"}, '
                    '{backend = "queued", chunk_size = 32, t_inner = 8, heads_per_band = 2}]\n'
                    '[model]\nname = "tiny"\ndevice = "cpu"\ncompile = false\n'
                    '[space]\nbackend = ["native", "queued"]\nchunk_size = [32, 64]\nheads_per_band = [2, 4]\n'
                    't_inner = [4, 8]\ndecode_mode = ["eager"]\n')
    rc = main(["study", "--experiment", str(spec), "--out-dir", str(tmp_path / "out"), *SMALL])
    assert rc == 0, capsys.readouterr().err[-2000:]
    trials = optuna.load_study(study_name="enq", storage=_journal(tmp_path / "out")).trials
    assert trials[0].user_attrs.get("baseline") is True
    assert trials[1].user_attrs.get("enqueued")
    assert {"backend": "native", "chunk_size": 64, "decode_mode": "eager"}.items() <= trials[1].params.items()
    assert trials[2].user_attrs.get("enqueued") and trials[2].params["backend"] == "queued"
    assert (trials[2].params["chunk_size"], trials[2].params["t_inner"], trials[2].params["heads_per_band"]) == (32, 8, 2)
    assert all(t.state.name == "COMPLETE" for t in trials)
    # an entry the space cannot produce is refused before anything is written
    spec.write_text(spec.read_text().replace('chunk_size = 64, decode_mode', 'chunk_size = 128, decode_mode').replace('"enq"', '"enq2"'))
    capsys.readouterr()
    rc = main(["study", "--experiment", str(spec), "--out-dir", str(tmp_path / "out2"), *SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "enqueue entry 1" in err and "[space]" in err, err
    assert not (tmp_path / "out2").exists()
