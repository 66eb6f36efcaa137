"""What measures a trial: the isolated worker process (study.worker), or a replayed record (study.replay).

Both answer `evaluate(number, knobs, fault, prune=..., time_limit_s=...)` with an outcome (metrics, fidelity, quality, outputs...) and
`confirm(configs, rounds, repeats)` with the raw interleaved round.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xlstm_tune.study.plan import StudyPlan
from xlstm_tune.study.worker import TrialWorker


class WorkerEvaluator:
    """Measures trials in an isolated worker process (study.worker)."""

    kind = "worker"

    def __init__(self, setup: dict[str, Any], log_dir: Path, trial_timeout_s: float, start_timeout_s: float) -> None:
        self.worker = TrialWorker(setup, log_dir, start_timeout_s)
        self.trial_timeout_s = trial_timeout_s
        self.load_s = 0.0  # model loads of every worker started (the time split's compile/warm-up part)
        self._starts_seen = 0

    @property
    def info(self) -> dict[str, Any] | None:
        return self.worker.info

    @property
    def listener(self) -> Any:
        """Who hears the worker's phase messages (study.progress.Progress), or None."""
        return self.worker.listener

    @listener.setter
    def listener(self, value: Any) -> None:
        self.worker.listener = value

    def _count_load(self) -> None:
        if self.worker.starts != self._starts_seen and self.worker.info:
            self._starts_seen = self.worker.starts
            self.load_s += float(self.worker.info.get("load_s") or 0.0)

    def start(self) -> dict[str, Any]:
        info = self.worker.ensure()
        self._count_load()
        return info

    def evaluate(self, number: int, knobs: Mapping[str, Any], fault: str | None = None, *,
                 prune: Mapping[str, Any] | None = None, time_limit_s: float | None = None,
                 hard_timeout_s: float | None = None) -> dict[str, Any]:
        """Measure one trial; `prune` and `time_limit_s` let the worker stop it early (study.pruning).
        The reply's `state` is COMPLETE, or PRUNED for a trial the worker stopped."""
        try:
            self.worker.ensure()
            self._count_load()
            return self.worker.request({"cmd": "trial", "number": number, "knobs": dict(knobs), "fault": fault,
                                        "prune": prune, "time_limit_s": time_limit_s},
                                       hard_timeout_s or self.trial_timeout_s, f"trial {number}")
        finally:
            self._count_load()

    def confirm(self, configs: list[dict[str, Any]], rounds: int, repeats: int) -> dict[str, Any]:
        timeout = self.trial_timeout_s * max(1, 2 * len(configs)) * rounds
        return self.worker.request({"cmd": "confirm", "configs": configs, "rounds": rounds, "repeats": repeats},
                                   timeout, "the confirmation round")

    def close(self) -> None:
        self.worker.close()


def make_evaluator(plan: StudyPlan) -> Any:
    """The replay evaluator for `--replay`, else a worker set up with the spec's workload and fidelity."""
    from xlstm_tune.study.replay import ReplayEvaluator

    if plan.src is not None:
        return ReplayEvaluator(plan.src)
    s = plan.spec
    setup = {
        "model": s.model["name"], "device": plan.caps["device"], "dtype": s.model["dtype"],
        "compile": s.model["compile"], "model_seed": s.model["seed"],
        "context_lens": s.context_lens, "new_tokens": s.workload["new_tokens"],
        "decode_context_len": s.workload["decode_context_len"],
        "batch_size": s.workload["batch_size"],
        "prompt_text": plan.prompt.text, "prompt_origin": plan.prompt.origin, "prompt_seed": plan.prompt.seed,
        "bench": dict(s.bench),
        "runtime": dict(s.runtime),
        "fidelity": {"rel_tol": s.rel_tol(), "min_greedy_agreement": s.fidelity["min_greedy_agreement"],
                     "prompt_len": s.fidelity["prompt_len"], "decode_steps": s.fidelity["decode_steps"]},
        "reference_path": str(plan.files.root / "reference" / "reference.pt"),
        "outputs_dir": str(plan.files.outputs_dir),
        "quality": {"perplexity": s.quality["perplexity"]},
    }
    return WorkerEvaluator(setup, plan.files.root / "workers", s.trial["timeout_s"], s.trial["worker_start_timeout_s"])
