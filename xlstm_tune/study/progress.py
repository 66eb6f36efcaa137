"""Progress of a study on stderr: a tqdm bar on a terminal, one plain line per trial otherwise."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO


class Progress:
    """A tqdm bar on a terminal (best so far as postfix); one plain line per trial otherwise."""

    def __init__(self, enabled: bool | None, total: int, initial: int, name: str, err: TextIO) -> None:
        self.err = err
        self.live = enabled if enabled is not None else bool(getattr(err, "isatty", lambda: False)())
        self.bar = None
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=min(initial, total), desc=f"study {name}", unit="trial",
                            file=err, dynamic_ncols=True, leave=True)

    def running(self, number: int, knobs: Mapping[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_description_str(f"trial {number} {knobs['backend']}/c{knobs['chunk_size']}")

    def done(self, rec: Mapping[str, Any], completed: int, best: str) -> None:
        if self.bar is not None:
            if rec["state"] == "COMPLETE":
                self.bar.update(1)
            self.bar.set_postfix_str(best, refresh=True)
            return
        if rec["state"] == "COMPLETE":
            what = f"prefill {rec.get('prefill_tok_s', float('nan')):,.0f} tok/s, decode {rec.get('decode_tok_s', float('nan')):,.0f} tok/s"
            if not rec.get("feasible"):
                what += f", INFEASIBLE (fidelity rel_err {rec.get('fidelity_rel_err', float('nan')):.1e})"
            if rec.get("duplicate_of") is not None:
                what += f" (same configuration as #{rec['duplicate_of']})"
        else:
            what = f"{rec.get('failure_reason')}: {rec.get('error') or rec.get('prune_reason') or ''}"[:200]
        self.err.write(f"[trial {rec['number']}] {rec['state']} {what} | {completed} complete | {best}\n")
        self.err.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
