"""Provenance: where a result came from (code commit, config hash, time, host software).

Results are only comparable when we know what produced them (docs/DESIGN.md §4 best.json, §5 "never against a
number from another day"), so every record carries these. Nothing here may fail a study: a missing git
binary or a tree outside a repository gives `None`, not an exception.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def git_commit(path: str | Path = ".") -> str | None:
    """HEAD's commit hash of the repository containing `path`, or None (not a repo, no git, timeout)."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    if proc.returncode != 0 or not commit:
        return None
    return commit


def canonical_json(config: Any) -> str:
    """JSON with sorted keys and no whitespace: equal configs give equal text whatever their key order."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def config_hash(config: dict[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of the canonical JSON of `config` (stable across runs)."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:16]


def now_iso() -> str:
    """Current UTC time, ISO-8601 with offset (e.g. `2026-11-25T17:49:01.123456+00:00`)."""
    return datetime.now(timezone.utc).isoformat()


def host_info() -> dict[str, Any]:
    """Host software versions (os, python, torch); torch is None where it is not importable."""
    try:
        import torch

        torch_version: str | None = str(torch.__version__)
    except Exception:  # noqa: BLE001 - provenance must never fail a study
        torch_version = None
    return {
        "os": platform.platform(),
        "python_version": sys.version.split()[0],
        "torch_version": torch_version,
    }
