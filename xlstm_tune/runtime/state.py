"""A model state's private copy: the recurrent state is a list of per-block tensor tuples, and whoever
keeps one that a graph replay or a later call would overwrite (captured buffers, timed calls) copies it."""
from __future__ import annotations

from typing import Any


def clone_state(state: Any) -> list[tuple[Any, ...]]:
    """Every tensor of `state` (list of per-block tuples) cloned, in the same layout."""
    return [tuple(t.clone() for t in block) for block in state]
