"""report.md (write_report) on synthetic records, and `python -m xlstm_tune plot` on a real study folder
with a real Optuna journal and a real sqlite MLflow store."""
from __future__ import annotations

import importlib.util
import math
import json
import re
from pathlib import Path
from typing import Any

import pytest
from study_fixtures import make_study, make_template_store

from xlstm_tune.cli.main import main
from xlstm_tune.study.plotting import load_importances, make_study_plots
from xlstm_tune.quality.report import write_report

KNOBS = dict(backend="queued", chunk_size=32, heads_per_band=2, workers=4, t_inner=4, streams=0,
             decode_mode="compiled")
IMAGE = re.compile(r"!\[[^\]]*\]\(<?([^)>]+)>?\)")


@pytest.fixture(autouse=True)
def _no_env_store(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def rec(number: int, decode: float | None, prefill: float | None, state: str = "COMPLETE", **extra: Any) -> dict:
    r: dict[str, Any] = {"number": number, "state": state, **KNOBS, "chunk_size": 16 * (number + 1)}
    if decode is not None:
        r.update(decode_tok_s=decode, decode_tok_s_p20=decode * 0.95, decode_tok_s_p80=decode * 1.05,
                 decode_tok_s_cv=0.031)
    if prefill is not None:
        r["prefill_tok_s"] = prefill
    if state == "COMPLETE":
        r.setdefault("fidelity_passed", True)
    r.update(extra)
    return r


def synthetic_records() -> list[dict]:
    return [
        rec(0, 20.0, 1000.0, is_default=True, fidelity_rel_err=1e-7, fidelity_kl_max=1e-9,
            distinct_1=0.5, perplexity=40.0, judge_overall=6, judge_coherence=5, judge="builtin"),
        rec(1, 50.0, 3000.0, fidelity_rel_err=2e-6, fidelity_kl_max=3e-8, distinct_1=0.7,
            perplexity=20.0, judge_overall=8, judge_coherence=7, judge="builtin"),
        rec(2, 40.0, 5000.0, fidelity_rel_err=5e-6, distinct_1=0.6, perplexity=30.0),
        rec(3, 90.0, 9000.0, fidelity_passed=False, fidelity_rel_err=0.3, fidelity_kl_max=0.5),
        rec(4, None, None, state="FAIL", fail_reason="out of memory"),
        rec(5, None, None, state="PRUNED"),
    ]


def image_links(report: Path) -> list[str]:
    return IMAGE.findall(report.read_text(encoding="utf-8"))


def table_rows(text: str, heading: str) -> list[list[str]]:
    """Data rows of the first Markdown table after ``heading``."""
    section = text.split(heading, 1)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    rows = []
    for ln in lines[2:]:
        rows.append([c.strip() for c in ln.strip("|").split(" | ")])
        if section.split(ln, 1)[1].startswith("\n\n"):
            break
    return rows


# ---- write_report -------------------------------------------------------------------------------------
def test_report_tables_speedups_fidelity_quality_plots_best(tmp_path: Path) -> None:
    plots_dir = tmp_path / "plots"
    plots_dir.mkdir()
    plots = [plots_dir / "history_decode_tok_s.png", plots_dir / "prefill_vs_decode.png"]
    for p in plots:
        p.write_bytes(b"\x89PNG\r\n\x1a\n")
    best = {"schema": "xlstm_tune.best/1", "contexts": [{"context_len": 256, "knobs": KNOBS}]}
    (tmp_path / "best.json").write_text(json.dumps(best))

    path = write_report(tmp_path, synthetic_records(), tmp_path / "best.json",
                        [*plots, plots_dir / "never_written.png"], notes=["importances skipped: test"])
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")

    assert "Trials: 6 (complete 4, fail 1, pruned 1); feasible: 3." in text
    decode = table_rows(text, "## Top configurations by decode throughput")
    assert [r[1] for r in decode] == ["1", "2", "0 (default)"]  # trial 3 failed fidelity: excluded
    # columns: ..., decode (spread, cv), speed-up, prefill, judge overall (top trials were judged)
    assert decode[0][-4] == "50.00 (47.50–52.50), cv 3.1%"
    assert decode[0][-3] == "2.50×" and decode[2][-3] == "1.00×"
    assert decode[0][-2] == "3,000" and decode[0][-1] == "8"
    prefill = table_rows(text, "## Top configurations by prefill throughput")
    assert [r[1] for r in prefill] == ["2", "1", "0 (default)"] and prefill[0][-3] == "5.00×"

    assert "Checked trials: 4; passed: 3 (75.0%); failed: 1." in text
    assert ("Worst relative logit error ‖out−ref‖/‖ref‖: 0.3 (trial 3; over 4 trial(s)); "
            "among passing trials: 5.00e-06 (trial 2).") in text
    assert "Trials that failed fidelity (excluded from the top tables): 3." in text
    quality = table_rows(text, "Text metrics of the feasible trials")
    assert ["distinct_1", "3", "0.6", "0.5", "0.7"] in quality
    assert ["perplexity", "3", "30.00", "20.00", "40.00"] in quality
    judge = table_rows(text, "Judge scores (1–10) of the feasible trials by builtin")
    assert ["judge_overall", "2", "7.00", "6.00", "8.00"] in judge

    links = image_links(path)
    assert links == ["plots/history_decode_tok_s.png", "plots/prefill_vs_decode.png"]
    assert all((tmp_path / link).is_file() for link in links)
    fenced = text.split("## best.json", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(fenced) == best
    assert "- importances skipped: test" in text


def test_report_without_default_uses_recorded_speedups(tmp_path: Path) -> None:
    records = [rec(0, 30.0, 100.0, speedup_vs_default={"decode": 1.5, "prefill_tok_s": 2.0}),
               rec(1, 10.0, 50.0, speedup_vs_default=0.8)]
    text = write_report(tmp_path, records, None, []).read_text()
    assert "speed-ups are the `speedup_vs_default` values" in text
    assert table_rows(text, "by decode throughput")[0][-2] == "1.50×"
    assert table_rows(text, "by prefill throughput")[0][-2] == "2.00×"
    assert table_rows(text, "by decode throughput")[1][-2] == "0.80×"
    assert "No best.json was written" in text and "No plots were written." in text


def test_report_of_an_empty_or_failed_study_is_still_written(tmp_path: Path) -> None:
    text = write_report(tmp_path, [rec(0, None, None, state="FAIL")], tmp_path / "best.json", []).read_text()
    assert "No default configuration was measured" in text
    assert "No feasible completed trial measured decode_tok_s." in text
    assert "No trial recorded a fidelity verdict" in text and "No judge scores" in text
    assert write_report(tmp_path, [], None, []).read_text().startswith(f"# Study `{tmp_path.name}`")
    # An explicit default_record wins over flags, and is shown even when it is not in the records.
    default = rec(9, 10.0, 100.0)
    text = write_report(tmp_path, [rec(0, 30.0, 300.0)], None, [], default_record=default).read_text()
    assert table_rows(text, "by decode throughput")[0][-2] == "3.00×"
    assert table_rows(text, "## Default configuration")[0][0] == "9"


def test_report_escapes_table_cells_and_odd_plot_paths(tmp_path: Path) -> None:
    odd = tmp_path / "plots dir"
    odd.mkdir()
    (odd / "a (1).png").write_bytes(b"png")
    r = rec(0, 10.0, 10.0, backend="que|ued")
    text = write_report(tmp_path, [r], None, [odd / "a (1).png"]).read_text()
    assert "que\\|ued" in text
    assert "](<plots dir/a (1).png>)" in text


# ---- importances ----------------------------------------------------------------------------------------
def _journal_study(path: Path, name: str, n_trials: int, multi: bool) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(path)))
    directions = ["maximize", "maximize"] if multi else ["maximize"]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                sampler=optuna.samplers.RandomSampler(seed=1))
    if multi:
        with pytest.warns(optuna.exceptions.ExperimentalWarning):
            study.set_metric_names(["prefill_tok_s", "decode_tok_s"])

    def objective(trial: optuna.Trial) -> Any:
        backend = trial.suggest_categorical("backend", ["queued", "native", "ray"])
        chunk = trial.suggest_categorical("chunk_size", [16, 32, 64, 128])
        decode = {"queued": 10.0, "native": 50.0, "ray": 5.0}[backend] + chunk / 1000
        return (chunk * 10.0, decode) if multi else decode

    study.optimize(objective, n_trials=n_trials)


def test_load_importances(tmp_path: Path) -> None:
    journal = tmp_path / "optuna.journal"
    _journal_study(journal, "multi", 24, multi=True)
    imp, label, note = load_importances(str(journal), "multi")
    assert label == "decode_tok_s" and "over 24 complete trial(s)" in note
    assert set(imp) == {"backend", "chunk_size"} and sum(imp.values()) == pytest.approx(1.0)
    assert imp["backend"] > imp["chunk_size"]  # decode depends on the backend; chunk_size moves it by < 0.13
    if importlib.util.find_spec("sklearn") is not None:  # fANOVA: variance explained
        assert imp["backend"] > 0.9
    _journal_study(journal, "one", 1, multi=False)
    imp, label, note = load_importances(str(journal), "one")
    assert imp is None and "1 complete trial(s)" in note
    imp, _, note = load_importances(str(journal), "absent")
    assert imp is None and "cannot load Optuna study 'absent'" in note
    imp, _, note = load_importances(str(tmp_path / "no.journal"), "multi")
    assert imp is None and "no Optuna journal" in note and not (tmp_path / "no.journal").exists()
    imp, _, note = load_importances(f"sqlite:///{tmp_path}/none.db", "multi")
    assert imp is None and "no Optuna database" in note and not (tmp_path / "none.db").exists()


# ---- the plot command -------------------------------------------------------------------------------------
def test_plot_command_writes_plots_report_and_logs_to_mlflow(tmp_path: Path, capsys) -> None:
    from mlflow import MlflowClient

    template = make_template_store(tmp_path / "template")
    out = tmp_path / "out"
    out.mkdir()
    study = make_study(out, "demo", template)
    _journal_study(out / "optuna.journal", "demo", 12, multi=True)
    (study.files.root / "ratings.jsonl").write_text(
        json.dumps({"number": 1, "judge": "builtin", "judge_overall": 7, "judge_coherence": 6,
                    "judge_valid": True}) + "\n")

    assert main(["plot", "--study", "demo", "--out-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert "report:" in captured.out and f"parent run {study.parent_id}" in captured.out

    report = study.files.root / "report.md"
    links = image_links(report)
    assert "plots/param_importances.png" in links and "plots/prefill_vs_decode.png" in links
    assert len(links) == 18 and all((study.files.root / link).is_file() for link in links)
    text = report.read_text()
    assert "Judge scores (1–10) of the feasible trials by builtin" in text  # ratings merged
    assert "No best.json was written" in text

    client = MlflowClient(study.tracking_uri)
    logged = {a.path for a in client.list_artifacts(study.parent_id, "plots")}
    assert {f"plots/{Path(link).name}" for link in links} == logged
    assert "report.md" in {a.path for a in client.list_artifacts(study.parent_id)}
    assert client.get_run(study.parent_id).info.status == "FINISHED"


def test_plot_without_optuna_storage_or_mlflow_store(tmp_path: Path) -> None:
    study = make_study(tmp_path, "bare")
    outcome = make_study_plots(tmp_path, "bare")
    assert outcome.importances is None and outcome.mlflow_run_id is None
    text = outcome.report.read_text()
    assert "knob importances skipped: no Optuna storage" in text and "MLflow: plots not logged" in text
    assert "param_importances" not in text
    assert all((study.files.root / link).is_file() for link in image_links(outcome.report))
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "optuna.journal").exists()


def test_plot_unknown_study_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["plot", "--study", "ghost", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no study 'ghost'" in err


def test_trials_answered_from_an_identical_configuration_are_ranked_once(tmp_path: Path) -> None:
    records = [rec(0, 30.0, 100.0), rec(1, 30.0, 100.0, duplicate_of=0), rec(2, 10.0, 50.0)]
    text = write_report(tmp_path, records, None, []).read_text()
    ranked = [row[1] for row in table_rows(text, "by decode throughput")]
    assert ranked == ["0", "2"]


def test_prefill_table_labels_the_geometric_mean_and_fills_each_length_spread(tmp_path: Path) -> None:
    def per_len(number: int, a: float, b: float, **extra: Any) -> dict:
        r = rec(number, 10.0, math.sqrt(a * b), context_lens=[128, 512], context_len=512, **extra)
        for n, v in ((128, a), (512, b)):
            r.update({f"prefill_tok_s_ctx{n}": v, f"prefill_tok_s_ctx{n}_p20": v * 0.9,
                      f"prefill_tok_s_ctx{n}_p80": v * 1.1, f"prefill_tok_s_ctx{n}_cv": 0.05})
        return r

    records = [per_len(0, 400.0, 100.0, is_default=True), per_len(1, 1600.0, 400.0, params={"workers": 4})]
    text = write_report(tmp_path, records, None, []).read_text()
    section = text.split("## Top configurations by prefill throughput", 1)[1]
    header = next(ln for ln in section.splitlines() if ln.startswith("|"))
    cols = [c.strip() for c in header.strip("|").split(" | ")]
    assert "context_len" not in cols  # 512 next to a mean over 128 and 512 was a wrong label
    assert "prefill tok/s, geometric mean over contexts 128, 512" in cols
    assert "ctx 128 tok/s (p20–p80, cv)" in cols and "ctx 512 tok/s (p20–p80, cv)" in cols
    rows = table_rows(text, "## Top configurations by prefill throughput")
    first = dict(zip(cols, rows[0]))
    assert first["prefill tok/s, geometric mean over contexts 128, 512"] == "800.0"
    assert first["ctx 128 tok/s (p20–p80, cv)"] == "1,600 (1,440–1,760), cv 5.0%"
    assert first["ctx 512 tok/s (p20–p80, cv)"] == "400.0 (360.0–440.0), cv 5.0%"
    assert first["speed-up vs default"] == "4.00×"
    assert first["workers"] == "4" and first["chunk_size"] == "32"  # the record's knob, not params


def test_confirmation_section_shows_both_phases_with_intervals_and_no_winner(tmp_path: Path) -> None:
    won = {"speedup": 1.84, "low": 1.62, "high": 2.1, "rounds": 3, "verdict": "wins"}
    tie = {"speedup": 1.01, "low": 0.95, "high": 1.07, "rounds": 3, "verdict": "not worse"}
    best = {"schema": "xlstm_tune.best/1", "contexts": [
        {"context_len": 128, "knobs": KNOBS, "winner": True, "trial_number": 4, "is_default": False,
         "confirmation": {"paired_rounds": 3, "confidence": 0.95, "max_trade": 0.0, "prefill": won, "decode": tie}},
        {"context_len": 512, "knobs": KNOBS, "winner": False, "trial_number": 0, "is_default": True,
         "reason": "no candidate is faster than the default with 95% confidence",
         "confirmation": {"paired_rounds": 3, "confidence": 0.95, "max_trade": 0.0, "key": "k", "trial_number": 6,
                          "prefill": tie, "decode": dict(tie, speedup=0.8, low=0.7, high=0.9, verdict="worse")}}]}
    (tmp_path / "best.json").write_text(json.dumps(best))
    text = write_report(tmp_path, synthetic_records(), tmp_path / "best.json", []).read_text()
    rows = table_rows(text, "## Confirmation")
    assert rows[0] == ["128", "trial 4", "1.84× [1.62–2.10] wins", "1.01× [0.95–1.07] not worse", "—"]
    assert rows[1] == ["512", "default (no winner)", "1.01× [0.95–1.07] not worse", "0.80× [0.70–0.90] worse",
                       "no candidate is faster than the default with 95% confidence"]
    assert "3 paired round(s)" in text and "95% interval (bootstrap and Student t envelope)" in text
