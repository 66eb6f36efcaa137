"""`python -m xlstm_tune judge` in-process on a real study folder and a real sqlite MLflow store.

The ollama judge talks to a loopback HTTP server (no mocks); the builtin judge needs no network.
"""
from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from study_fixtures import OUTPUTS, PROMPT, make_study, make_template_store

from xlstm_tune.cli.main import main
from xlstm_tune.quality.judges import BuiltinJudge
from xlstm_tune.quality.judging import (
    RATING_COLUMNS,
    find_prompt,
    judge_outputs,
    merge_ratings,
    rating_metrics,
    ratings_csv,
    ratings_jsonl,
    read_outputs,
)

pytest.importorskip("mlflow")

SCORES = ("judge_coherence", "judge_relevance", "judge_fluency", "judge_overall")


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template_store(tmp_path_factory.mktemp("mltemplate"))


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def strict_json(line: str) -> Any:
    def reject(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


class JudgeServer:
    """Loopback Ollama stand-in: answers /api/chat with scores derived from the continuation."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "body": body})
                user = body["messages"][1]["content"]
                data = json.loads(user.split("<data>", 1)[1].split("</data>", 1)[0])
                overall = 2 if "the sea the sea" in data["continuation"] else 9
                answer = {"coherence": overall, "relevance": 5, "fluency": overall, "overall": overall,
                          "rationale": "Scripted."}
                payload = json.dumps(
                    {"message": {"role": "assistant", "content": json.dumps(answer)}, "done": True}
                    if status == 200 else {"error": "model 'm' not found"}
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


# ---- the pure part ---------------------------------------------------------------------------------
def test_find_prompt_places(tmp_path: Path) -> None:
    assert find_prompt({"prompt": "top", "spec": {"prompt": "nested"}}) == "top"
    assert find_prompt({"spec": {"bench": {"prompt": "deep"}}}) == "deep"
    assert find_prompt({"prompt": ""}) == ""  # recorded as empty is still recorded
    (tmp_path / "p.txt").write_text("from file")
    assert find_prompt({"spec": {"prompt_file": "p.txt"}}, tmp_path) == "from file"
    assert find_prompt({"prompt_file": "missing.txt"}, tmp_path) is None
    assert find_prompt({"model": "tiny"}) is None and find_prompt(None) is None


def test_read_outputs_and_rating_records(tmp_path: Path) -> None:
    for name, text in {"trial_2.txt": "b", "trial_10.txt": "c", "trial_x.txt": "no", "trial_1.json": "no",
                       "trial_0.txt": "caf\xe9"}.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "trial_3.txt").write_bytes(b"bad \xff byte")
    outs = read_outputs(tmp_path)
    assert list(outs) == [0, 2, 3, 10] and outs[0] == "caf\xe9" and outs[3] == "bad \ufffd byte"
    assert read_outputs(tmp_path / "nope") == {}

    seen: list[int] = []
    ratings = judge_outputs(BuiltinJudge(), None, outs, on_result=lambda n, r: seen.append(n))
    assert seen == [0, 2, 3, 10] and [r["number"] for r in ratings] == seen
    assert all(tuple(r) == RATING_COLUMNS for r in ratings)
    assert all(r["prompt_known"] is False and r["judge"] == "builtin" for r in ratings)

    ratings[0]["judge_latency_s"] = float("nan")  # must not leak a NaN token into the file
    lines = ratings_jsonl(ratings).splitlines()
    assert len(lines) == 4 and strict_json(lines[0])["judge_latency_s"] is None
    rows = list(csv.DictReader(ratings_csv(ratings).splitlines()))
    assert rows[0]["judge_valid"] == "true" and rows[0]["judge_latency_s"] == ""

    records = [{"number": 0, "judge_overall": 1, "judge": "old"}, {"number": 7, "judge_overall": 3}]
    merged = merge_ratings(records, ratings)
    assert merged[0]["judge_overall"] == ratings[0]["judge_overall"] and merged[0]["judge"] == "builtin"
    assert "judge_overall" not in merged[1]  # a stale score from an earlier judging is dropped
    assert "judge_raw" not in merged[0] and records[0]["judge"] == "old"  # inputs untouched
    assert rating_metrics(ratings[0]) == {"judge_valid": 1.0, **{k: float(ratings[0][k]) for k in SCORES}}
    assert rating_metrics({"judge_valid": False, "judge_overall": None}) == {"judge_valid": 0.0}


# ---- the command -----------------------------------------------------------------------------------
def test_judge_builtin_writes_files_summary_and_mlflow(tmp_path: Path, template_db: Path, capsys) -> None:
    from mlflow import MlflowClient

    study = make_study(tmp_path, "demo", template_db)
    assert main(["judge", "--study", "demo", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3/3 valid rating(s)" in out and "judge metrics on 3 trial run(s)" in out

    root = study.files.root
    ratings = [strict_json(line) for line in (root / "ratings.jsonl").read_text().splitlines()]
    assert [r["number"] for r in ratings] == [0, 1, 2]
    assert all(r["judge_valid"] and r["judge"] == "builtin" and r["prompt_known"] for r in ratings)
    by_n = {r["number"]: r for r in ratings}
    assert by_n[0]["judge_fluency"] > by_n[1]["judge_fluency"]  # the loop is penalised
    assert by_n[0]["output_chars"] == len(OUTPUTS[0])

    cols, rows = read_csv(root / "ratings.csv")
    assert cols == list(RATING_COLUMNS) and [int(r["number"]) for r in rows] == [0, 1, 2]

    cols, rows = read_csv(study.files.summary_path)
    assert cols[:4] == ["number", "state", "backend", "workers"]  # the seed columns still lead
    assert set(SCORES) | {"judge", "judge_valid", "judge_rationale"} <= set(cols)
    assert "judge_raw" not in cols
    summary = {int(r["number"]): r for r in rows}
    assert len(summary) == 4 and summary[3]["judge_overall"] == "" and summary[3]["state"] == "FAIL"
    assert int(summary[1]["judge_overall"]) == by_n[1]["judge_overall"]
    assert summary[0]["mlflow_run_id"] == study.child_ids[0]  # trial fields survive the rewrite

    client = MlflowClient(study.tracking_uri)
    for n in (0, 1, 2):  # by record id (0), by tag (1: no id, 2: stale id)
        metrics = client.get_run(study.child_ids[n]).data.metrics
        assert {k: metrics[k] for k in SCORES} == {k: float(by_n[n][k]) for k in SCORES}
        assert metrics["judge_valid"] == 1.0 and metrics["decode_tok_s"] == 50.0 + 10 * n
        assert client.get_run(study.child_ids[n]).data.tags["xlstm_tune.judge"] == "builtin"
    assert "judge_overall" not in client.get_run(study.child_ids[3]).data.metrics
    parent = client.get_run(study.parent_id)
    assert parent.info.status == "FINISHED"  # found read-only, not reopened
    assert sorted(a.path for a in client.list_artifacts(study.parent_id, "judge")) == [
        "judge/ratings.csv", "judge/ratings.jsonl"]

    # Re-judging replaces the ratings (same scores: the builtin judge is deterministic).
    def scores() -> list[tuple[str, ...]]:
        return [tuple(r[k] for k in ("number", *SCORES)) for r in read_csv(root / "ratings.csv")[1]]

    before = scores()
    assert main(["judge", "--study", "demo", "--out-dir", str(tmp_path)]) == 0
    assert scores() == before and len(before) == 3


def test_judge_ollama_against_loopback_server(tmp_path: Path, template_db: Path, capsys) -> None:
    from mlflow import MlflowClient

    study = make_study(tmp_path, "remote", template_db)
    server = JudgeServer()
    try:
        rc = main(["judge", "--study", "remote", "--out-dir", str(tmp_path), "--judge", "ollama",
                   "--judge-url", server.url, "--judge-model", "llama3.1:8b",
                   "--tracking-uri", study.tracking_uri])
    finally:
        server.close()
    assert rc == 0, capsys.readouterr().err
    assert len(server.requests) == 3 and {r["path"] for r in server.requests} == {"/api/chat"}
    sent = [json.loads(r["body"]["messages"][1]["content"].split("<data>")[1].split("</data>")[0])
            for r in server.requests]
    assert sorted(d["continuation"] for d in sent) == sorted(OUTPUTS.values())
    assert {d["prompt"] for d in sent} == {PROMPT} and server.requests[0]["body"]["model"] == "llama3.1:8b"

    ratings = {r["number"]: r for r in map(strict_json, (study.files.root / "ratings.jsonl").read_text().splitlines())}
    assert [ratings[n]["judge_overall"] for n in (0, 1, 2)] == [9, 2, 9]
    assert ratings[0]["judge"] == "ollama:llama3.1:8b" and ratings[0]["judge_attempts"] == 1
    client = MlflowClient(study.tracking_uri)
    assert client.get_run(study.child_ids[1]).data.metrics["judge_overall"] == 2.0
    _, rows = read_csv(study.files.summary_path)
    assert [r["judge_overall"] for r in rows] == ["9", "2", "9", ""]


def test_judge_without_prompt_or_mlflow_store(tmp_path: Path, capsys) -> None:
    study = make_study(tmp_path, "offline", template_db=None, prompt=None)
    server = JudgeServer()
    try:
        rc = main(["judge", "--study", "offline", "--out-dir", str(tmp_path), "--judge", "ollama",
                   "--judge-url", server.url, "--judge-model", "m"])
    finally:
        server.close()
    captured = capsys.readouterr()
    assert rc == 0
    assert "records no prompt" in captured.err and "MLflow: skipped (no MLflow store" in captured.out
    assert {json.loads(r["body"]["messages"][1]["content"].split("<data>")[1].split("</data>")[0])["prompt"]
            for r in server.requests} == {""}
    assert not (tmp_path / "mlflow.db").exists()  # no store conjured up
    ratings = [strict_json(line) for line in (study.files.root / "ratings.jsonl").read_text().splitlines()]
    assert all(r["prompt_known"] is False for r in ratings)


def test_unreachable_judge_writes_nothing(tmp_path: Path, capsys) -> None:
    study = make_study(tmp_path, "bad-judge")
    summary_before = study.files.summary_path.read_text()
    server = JudgeServer(status=400)  # not retried: the request itself is wrong
    try:
        rc = main(["judge", "--study", "bad-judge", "--out-dir", str(tmp_path), "--judge", "ollama",
                   "--judge-url", server.url, "--judge-model", "m"])
    finally:
        server.close()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "no valid answer for any of 3 output(s)" in err and "HTTP 400" in err
    assert not (study.files.root / "ratings.jsonl").exists() and not (study.files.root / "ratings.csv").exists()
    assert study.files.summary_path.read_text() == summary_before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["judge", "--study", "nope"], "no study 'nope' in"),
        (["judge", "--study", "a/b"], "cannot be used as a directory name"),
        (["judge", "--study", "demo", "--judge", "ollama"], "needs a server URL"),
        (["judge", "--study", "demo", "--judge", "openai", "--judge-url", "http://127.0.0.1:1"], "needs a model name"),
        (["judge", "--study", "demo", "--tracking-uri", "./mlruns"], "file-store path"),
        (["judge", "--study", "empty"], "has no saved outputs"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    make_study(tmp_path, "demo")
    (tmp_path / "studies" / "empty").mkdir()
    rc = main([*argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert err.startswith("xlstm_tune judge: error:")
    if "nope" in argv:
        assert "demo" in err and "empty" in err  # names the studies that do exist
    assert not (tmp_path / "studies" / "demo" / "ratings.jsonl").exists()
