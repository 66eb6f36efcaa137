"""Batch-1 decode product tiles pinned per GPU model and product shape (`decode_tiles.json` beside this file).

Triton's autotuner times each tile configuration of a product in isolation, once per process. Inside the
captured decode graph, under dependent launch, what matters is how much of each row a program loads before
it waits, which isolated timing does not see; and when two configurations time alike its pick changes from
process to process, moving a whole decode token by up to ~10% (docs/PERFORMANCE.md, 2026-12-03). A tile
listed here for the running GPU is used as it is; shapes not listed are autotuned as before.
`benchmarks/tune_decode_tiles.py --write` measures the tiles inside the graph and writes the entries.

    {"devices": {"<torch.cuda.get_device_name()>": {"N=1024 K=2752 prologue=0 epilogue=1": [4, 1024, 8, 2]}}}

An entry's value is [BLOCK_N, BLOCK_K, num_warps, num_stages].
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from xlstm_tune.atomic_files import write_json_atomic

TILES_FILE = Path(__file__).with_name("decode_tiles.json")
ShapeKey = tuple[int, int, int, int]  # (N, K, prologue, epilogue) of a batch-1 product
Tile = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
_KEY = re.compile(r"^N=(\d+) K=(\d+) prologue=(\d) epilogue=(\d)$")


def shape_name(key: ShapeKey) -> str:
    return "N={} K={} prologue={} epilogue={}".format(*key)


def _power_of_two(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _tile(path: Path, device: str, name: str, value: Any) -> Tile:
    fix = f"fix the entry or rerun benchmarks/tune_decode_tiles.py --write on a {device}"
    if not (isinstance(value, list) and len(value) == 4 and all(type(v) is int for v in value)):
        raise ValueError(f"{path}: {device} / {name}: expected [BLOCK_N, BLOCK_K, num_warps, num_stages] integers, "
                         f"got {value!r}: {fix}")
    bn, bk, warps, stages = value
    if not (_power_of_two(bn) and _power_of_two(bk) and bk >= 16 and warps in (1, 2, 4, 8, 16) and 1 <= stages <= 8):
        raise ValueError(f"{path}: {device} / {name}: {value} is not a tile (BLOCK_N and BLOCK_K powers of two, "
                         f"BLOCK_K >= 16, num_warps 1-16, num_stages 1-8): {fix}")
    return bn, bk, warps, stages


def load_tiles(path: str | Path = TILES_FILE) -> dict[str, dict[ShapeKey, Tile]]:
    """Every device's pinned tiles, validated; ValueError naming the entry and the fix if one is malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the pinned decode tiles ({exc}): restore the file from the "
                         "repository") from None
    devices = doc.get("devices") if isinstance(doc, dict) else None
    if not isinstance(devices, dict):
        raise ValueError(f'{path}: expected {{"devices": {{...}}}}: restore the file from the repository')
    out: dict[str, dict[ShapeKey, Tile]] = {}
    for device, entries in devices.items():
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: {device}: expected an object of shapes: restore the file from the repository")
        tiles: dict[ShapeKey, Tile] = {}
        for name, value in entries.items():
            m = _KEY.match(name)
            if not m:
                raise ValueError(f"{path}: {device}: {name!r} is not a shape (want 'N=.. K=.. prologue=. epilogue=.'): "
                                 "fix the entry")
            key: ShapeKey = (int(m[1]), int(m[2]), int(m[3]), int(m[4]))
            tiles[key] = _tile(path, device, name, value)
        out[device] = tiles
    return out


def save_tiles(device: str, tiles: dict[ShapeKey, Tile], path: str | Path = TILES_FILE) -> Path:
    """Set `device`'s entries for these shapes, atomically. Its other shapes (another model tuned on the same
    GPU) and other devices are kept; the file is validated first, so a malformed one is not built upon."""
    path = Path(path)
    merged = load_tiles(path) if path.is_file() else {}
    merged.setdefault(device, {}).update(tiles)
    doc = {"devices": {d: {shape_name(k): list(v) for k, v in sorted(entries.items())}
                       for d, entries in sorted(merged.items())}}
    return write_json_atomic(path, doc)
