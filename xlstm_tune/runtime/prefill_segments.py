"""Prompts fed in pieces of a bounded set of lengths, each continuing the state the one before left.

With `compile` on, every new prompt length compiles the prefill functions (seconds on a GPU, tens of
seconds on a CPU, and dynamo raises after 256 shapes per function); with `prefill_graph` on, every new
length also costs a warm-up run and a capture. A server sees many lengths. The `prefill_segment` setting
(`XLSTM_PREFILL_SEGMENT`, tokens; 0, the default, feeds every prompt whole) bounds them: a prompt runs as
full segments of that many tokens, then the rest in pieces of powers of two, largest first. A process
then meets at most 1 + log2(segment) piece lengths per batch size, whatever its prompts.

The answers are the whole prompt's up to float32 rounding: the recurrence carries its float32 state from
piece to piece exactly as it does from chunk to chunk inside one call. What a piece costs is its own
launches (or one replay with `prefill_graph`), so on a launch-bound model fewer, longer pieces are faster.
"""
from __future__ import annotations

import os

from xlstm_tune.errors import UserError

SEGMENT_ENV = "XLSTM_PREFILL_SEGMENT"
MAX_SEGMENT = 65536


def check_segment(value: int, where: str = "prefill_segment") -> int:
    """A segment length in 0..MAX_SEGMENT (0: prompts fed whole), or a one-line error."""
    if not 0 <= value <= MAX_SEGMENT:
        raise UserError(f"{where}={value} is outside 0..{MAX_SEGMENT}: give a length in tokens such as 2048, "
                        "or 0 to feed every prompt whole")
    return value


def parse_segment(value: object, where: str = "prefill_segment") -> int:
    """A segment length from a flag, a table or the environment: an integer in 0..MAX_SEGMENT."""
    from xlstm_tune.runtime.options import _as_int

    return check_segment(_as_int(where, value), where)


def current_segment() -> int:
    """The segment length in force (read per call from XLSTM_PREFILL_SEGMENT, like the kernel switches)."""
    raw = os.environ.get(SEGMENT_ENV, "").strip()
    return parse_segment(raw, SEGMENT_ENV) if raw else 0


def shape_bound(segment: int) -> int:
    """How many prefill shapes per batch size a process meets at most with this segment length: each piece
    length (the segment and the powers of two below it), with and without a starting state (0: unbounded)."""
    return 2 * segment.bit_length() if segment > 0 else 0


def piece_lengths(total: int, segment: int) -> list[int]:
    """The lengths a prompt of `total` tokens runs as: whole when `segment` is 0, else full segments, then
    the remainder's powers of two from the largest down (1000 with segment 256: 256, 256, 256, 128, 64,
    32, 8)."""
    if segment <= 0 or total <= 0:
        return [total]
    pieces = [segment] * (total // segment)
    rest = total % segment
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest >= bit:
            pieces.append(bit)
            rest -= bit
        bit >>= 1
    return pieces
