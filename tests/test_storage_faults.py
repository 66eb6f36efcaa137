"""Broken storage through the real CLI: a torn, garbled or cut Optuna journal; a full disk (a small tmpfs);
a read-only results folder and a read-only MLflow store (read-only mounts).

Wanted every time: a torn tail is repaired and said in one line; anything else is one line, a non-zero
exit code, no traceback, and nothing torn or made worse. Mounting needs root; where it is refused the
disk tests are skipped with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("mlflow")

from xlstm_tune.study.journal_check import check_journal, trials_per_study  # noqa: E402

pytestmark = pytest.mark.slow
SMALL = ["--n-trials", "3", "--prefill-len", "32,64", "--new-tokens", "8", "--repeats", "2", "--no-progress",
         "--no-early-stopping"]  # these tests count COMPLETE trials; early stopping has tests/test_pruning.py
PROGRESS = ("[trial ", "[worker] ", "Confirmation round")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLSTM_", "MLFLOW_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _messages(stderr: str) -> list[str]:
    """stderr without the per-trial progress lines."""
    return [line for line in stderr.strip().splitlines() if line.strip() and not line.startswith(PROGRESS)]


def _load(journal: Path) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="quickstart", storage=JournalStorage(JournalFileBackend(str(journal))))


def _complete_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends in a partial line"
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-trial study on tiny (the embedded quickstart) in <tmp>/mlruns."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = subprocess.run([sys.executable, "-m", "xlstm_tune", "study", *SMALL], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "mlruns"


@pytest.fixture
def copy(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "mlruns")
    return tmp_path / "mlruns"


# ---- the Optuna journal -----------------------------------------------------------------------------
def test_torn_tail_is_repaired_and_the_rerun_leaves_a_loadable_journal(copy: Path, spawn) -> None:
    journal = copy / "optuna.journal"
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    torn = data + last[: len(last) // 2]  # a writer killed mid-append: its record lacks its end
    journal.write_bytes(torn)
    more = [*SMALL, "--n-trials", "4"]  # one more trial: the rerun appends to the repaired file
    proc = spawn.cli("study", *more, cwd=copy.parent, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "repaired the Optuna journal" in line]
    assert len(said) == 1 and "dropped a partial last record (" in said[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (copy / "optuna.journal.bak").read_bytes() == torn  # the original kept, byte for byte
    study = _load(journal)  # the rerun's appends did not land on a partial line
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert journal.read_bytes().startswith(data) and journal.read_bytes().endswith(b"\n")
    again = spawn.cli("study", *more, cwd=copy.parent, env=_env())  # and it keeps loading from then on
    assert again.returncode == 0 and "repaired" not in again.stderr, again.stderr[-2000:]


@pytest.mark.parametrize("damage,needle", [("garbage", "is damaged: line 11 of"), ("cut", "was cut short")])
def test_damaged_journal_is_refused_in_one_line_and_left_as_it_was(copy: Path, spawn, damage: str, needle: str) -> None:
    journal = copy / "optuna.journal"
    data = journal.read_bytes()
    if damage == "garbage":
        lines = data.split(b"\n")
        lines[10] = b"\xff\xfe not a record \x00"
        data = b"\n".join(lines)
    else:
        data = data[: len(data) // 2]
    journal.write_bytes(data)
    before = sorted(p.name for p in copy.iterdir())
    proc = spawn.cli("study", *SMALL, cwd=copy.parent, env=_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(_messages(proc.stderr)) == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert journal.read_bytes() == data  # never made worse
    assert sorted(p.name for p in copy.iterdir()) == before  # no backup, no lock left, nothing new


def test_journal_check_on_files(tmp_path: Path) -> None:
    """A clean journal is not rewritten; a complete last record without its newline gets one."""
    rec = lambda op, **kw: json.dumps({"op_code": op, "worker_id": "w", **kw}).encode()  # noqa: E731
    clean = b"\n".join([rec(0, study_name="s", directions=[2]), rec(4, study_id=0), rec(4, study_id=0)]) + b"\n"
    path = tmp_path / "optuna.journal"
    path.write_bytes(clean)
    inode = path.stat().st_ino
    assert check_journal(path, tmp_path) is False and path.stat().st_ino == inode
    path.write_bytes(clean + rec(4, study_id=0))
    assert check_journal(path, tmp_path) is True
    assert path.read_bytes() == clean + rec(4, study_id=0) + b"\n"
    records = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert trials_per_study(records) == {"s": 3}


# ---- full and read-only disks ------------------------------------------------------------------------
@pytest.fixture
def mount_point(tmp_path: Path):
    """Mount tmpfs file systems under tmp_path (`mount(size)`), unmounted at teardown, pass or fail."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _read_only(target: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)


@pytest.mark.parametrize("size", ["1280k", "2m"])
def test_full_disk_fails_in_one_line_with_nothing_torn(mount_point, spawn, size: str) -> None:
    disk = mount_point(size)
    proc = spawn.cli("study", *SMALL, cwd=disk, env=_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    messages = _messages(proc.stderr)
    assert len(messages) == 1 and "no space left" in messages[0] and "--out-dir" in messages[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    study = disk / "mlruns" / "studies" / "quickstart"
    if (study / "trials.jsonl").exists():
        assert all(isinstance(r["number"], int) for r in _complete_lines(study / "trials.jsonl"))
    for png in disk.rglob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.read_bytes().endswith(b"IEND\xaeB`\x82"), png
    assert not list(disk.rglob("*.tmp")), "a temporary file was left behind"
    for name in ("run_meta.json", "best.json", "confirm.json"):
        if (study / name).exists():
            json.loads((study / name).read_text())  # whole, never half-written
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{disk / 'mlruns' / 'mlflow.db'}")
    parents = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
               if r.data.tags.get("xlstm_tune.role") == "parent"]
    statuses = [r.info.status for r in parents]
    assert statuses in (["FAILED"], ["RUNNING"])
    # Where the database still had room for the study's last update, the parent run says FAILED. Which file
    # the disk fills on depends on how far the study got (trials pruned or not under the machine's load), so
    # whether there was room is asked of the database itself, with that very update (the study's
    # end_parent is set_terminated): a run left RUNNING whose update the database takes now had room.
    if statuses == ["RUNNING"]:
        assert not _takes_the_parents_last_update(client, parents[0].info.run_id), shutil.disk_usage(disk)


def _takes_the_parents_last_update(client, run_id: str) -> bool:
    """Whether the MLflow store can still commit what the study's end_parent("FAILED") writes."""
    try:
        client.set_terminated(run_id, "FAILED")
        return True
    except Exception:  # noqa: BLE001 - the full disk surfaces as MlflowException or an SQLAlchemy error
        return False


def test_read_only_results_folder_is_one_line(mount_point, finished: Path, spawn) -> None:
    disk = mount_point("20m")
    shutil.copytree(finished, disk / "mlruns")
    _read_only(disk)
    for args in (["study", *SMALL], ["plot", "--study", "quickstart"]):
        proc = spawn.cli(*args, cwd=disk, env=_env())
        assert proc.returncode == 2, proc.stderr[-3000:]
        messages = _messages(proc.stderr)
        assert len(messages) == 1 and "read-only" in messages[0] and "Traceback" not in proc.stderr, proc.stderr


def test_read_only_mlflow_store_is_one_line(mount_point, finished: Path, spawn) -> None:
    disk = mount_point("20m")
    shutil.copytree(finished, disk / "mlruns")
    db = disk / "mlruns" / "mlflow.db"
    # the database file alone read-only (root ignores file modes: a read-only bind mount of the file)
    subprocess.run(["mount", "--bind", str(db), str(db)], check=True, capture_output=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(db)], check=True, capture_output=True)
        proc = spawn.cli("study", *SMALL, "--n-trials", "4", cwd=disk, env=_env())
    finally:
        subprocess.run(["umount", "-l", str(db)], capture_output=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    messages = _messages(proc.stderr)
    assert len(messages) == 1 and ("read-only" in messages[0] or "readonly" in messages[0]), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "[SQL:" not in proc.stderr
