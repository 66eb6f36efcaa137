"""Writers that must never leave a torn file, tested by killing or starving a real writer process.

- write_bytes_atomic: a child rewrites a large file over and over and is SIGKILLed mid-write (while its
  temporary file is growing); the target is then exactly the old or the new content, never a mix.
- StudyFiles.append_trial: a child whose file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) stops the
  write half-way gets EFBIG, and trials.jsonl is rolled back to its previous complete lines.
"""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from xlstm_tune.tracking.study_files import StudyFiles

SIZE = 32 * 1024 * 1024

WRITER = textwrap.dedent("""
    import sys
    from xlstm_tune.atomic_files import write_bytes_atomic
    target, size = sys.argv[1], int(sys.argv[2])
    blocks = [bytes([65 + k]) * size for k in range(2)]
    k = 0
    while True:
        write_bytes_atomic(target, blocks[k % 2])
        k += 1
""")


def test_killed_atomic_writer_leaves_old_or_new_never_torn(tmp_path: Path, spawn) -> None:
    target = tmp_path / "big.bin"
    target.write_bytes(b"A" * SIZE)
    digests = {hashlib.sha256(bytes([65 + k]) * SIZE).hexdigest() for k in range(2)}
    for attempt in range(3):
        proc = spawn([sys.executable, "-c", WRITER, str(target), str(SIZE)])
        deadline = time.monotonic() + 120
        while True:  # wait until a write is under way: its temporary file exists and is part-written
            tmps = [p for p in tmp_path.glob(".big.bin.*.tmp") if 0 < _size(p) < SIZE]
            if tmps:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never got under way"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert hashlib.sha256(target.read_bytes()).hexdigest() in digests, f"torn after kill {attempt}"
        for tmp in tmp_path.glob(".big.bin.*.tmp"):  # a kill leaves its temporary file: never the target
            tmp.unlink()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


APPENDER = textwrap.dedent("""
    import errno, resource, signal, sys
    from xlstm_tune.tracking.study_files import StudyFiles
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit write() fails with EFBIG instead
    files = StudyFiles(sys.argv[1])
    limit = files.trials_path.stat().st_size + 100
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        files.append_trial({"number": 9, "blob": "x" * 5000})
    except OSError as exc:
        assert exc.errno == errno.EFBIG, exc
        print("EFBIG", exc.filename)
        sys.exit(0)
    sys.exit("the append did not fail")
""")


def test_append_that_fails_half_way_is_rolled_back(tmp_path: Path, spawn) -> None:
    files = StudyFiles(tmp_path / "study")
    for n in range(3):
        files.append_trial({"number": n, "state": "COMPLETE"})
    before = files.trials_path.read_bytes()
    proc = spawn([sys.executable, "-c", APPENDER, str(files.root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["EFBIG", str(files.trials_path)]  # the error names the file
    assert files.trials_path.read_bytes() == before  # not a byte of the partial line left
    assert [json.loads(x)["number"] for x in before.splitlines()] == [0, 1, 2]
