"""Isolated trial workers: one process loads the model once and serves trial after trial.

Parent side (`TrialWorker`) and worker side (`worker_main`) talk over a `multiprocessing` pipe (spawn
context, so the worker never inherits the parent's threads, locks or MLflow clients):

    worker -> {"type": "phase", "number": n | None, "stage": ..., "detail": ...}   any time: what it is doing
    worker -> {"type": "ready", "info": {...}}                   after loading the model and the reference
    parent -> {"cmd": "trial", "number": n, "knobs": {...}, "fault": None | kind,
               "prune": None | limits, "time_limit_s": None | s}              (study.pruning)
    worker -> {"type": "result", "state": "COMPLETE" | "PRUNED", ...}  or  {"type": "error", "reason": ..., "message": ..., "traceback": ...}
    parent -> {"cmd": "confirm", "configs": [...], "rounds": r, "repeats": k}
    parent -> {"cmd": "stop"}

The parent enforces the per-trial time limit (it kills the worker) and notices a worker that died (exit
code or signal): both fail the trial (`timeout`, `crash`) with the tail of the worker's log as the captured
error and the phase it was in, and the next trial gets a fresh worker. An exception inside the worker is
classified there (`faults.classify_exception`) and the worker is replaced as well: after an OOM, a memory
abort or a compiler failure the process state is not trusted with further measurements. Phase messages go
to the parent's `listener` (study.progress), which also hears a tick on every poll while the parent waits.

The worker's stdout/stderr go to a log file (faulthandler writes native crash tracebacks there), so
nothing a library prints can corrupt the protocol or the user's terminal. The worker ignores SIGINT
(the parent decides what Ctrl-C means) and exits when the parent's end of the pipe closes, so a
killed study never leaves a worker behind.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from xlstm_tune.atomic_files import write_text_atomic
from xlstm_tune.errors import UserError
from xlstm_tune.study.faults import classify_exception, describe_signal

LOG_TAIL_CHARS = 4000


class WorkerFailure(Exception):
    """A trial (or the worker) failed; `reason` is one of faults.FAILURE_REASONS."""

    def __init__(self, reason: str, message: str, detail: str = "", error_type: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail
        self.error_type = error_type


def _tail(path: Path, limit: int = LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# ======================================================================================================
# parent side
# ======================================================================================================
class TrialWorker:
    """A worker process that is started on demand and replaced after any failure."""

    def __init__(self, setup: dict[str, Any], log_dir: Path, start_timeout_s: float = 600.0) -> None:
        self.setup = setup
        self.log_dir = Path(log_dir)
        self.start_timeout_s = start_timeout_s
        self.proc: Any = None
        self.conn: Any = None
        self.info: dict[str, Any] | None = None
        self.starts = 0
        self.log_path: Path | None = None
        self.listener: Any = None  # .phase(msg) and .tick() while waiting (study.progress.Progress)
        self.last_phase: dict[str, Any] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> dict[str, Any]:
        """Start a worker and wait for it to load the model; UserError if it cannot."""
        self.close()
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"worker-{os.getpid()}-{self.starts}.log"
        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        setup = dict(self.setup, log_path=str(self.log_path))
        proc = ctx.Process(target=worker_main, args=(child_conn, setup), name=f"xlstm-tune-worker-{self.starts}")
        proc.start()
        child_conn.close()
        self.proc, self.conn = proc, parent_conn
        try:
            msg = self._wait(self.start_timeout_s, "starting")
        except WorkerFailure as exc:
            self.close()
            raise UserError(f"the trial worker could not start ({exc.reason}: {exc.message}); "
                            f"see {self.log_path}") from None
        if msg.get("type") == "fatal":
            self.close()
            raise UserError(f"the trial worker could not load the model: {msg.get('message')}")
        if msg.get("type") != "ready":
            self.close()
            raise UserError(f"the trial worker sent {msg.get('type')!r} instead of 'ready'; see {self.log_path}")
        self.info = msg["info"]
        return self.info

    def ensure(self) -> dict[str, Any]:
        if not self.alive or self.info is None:
            return self.start()
        return self.info

    def _kill(self) -> None:
        proc = self.proc
        if proc is None or not proc.is_alive():
            return
        try:
            if hasattr(os, "killpg") and os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker leads its own group: children go too
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError, OSError):
            pass
        proc.join(10)

    def _in_phase(self) -> str:
        """' (during <stage>: <detail>)' of the last phase the worker announced, for a failure's message."""
        ph = self.last_phase
        return f" (during {ph['stage']}: {ph['detail']})" if ph else ""

    def _wait(self, timeout_s: float, what: str) -> dict[str, Any]:
        """The worker's next reply; phase messages on the way go to the listener."""
        deadline = time.monotonic() + timeout_s
        self.last_phase = None
        while True:
            try:
                if self.conn.poll(0.1):
                    msg = self.conn.recv()
                    if msg.get("type") != "phase":
                        return msg
                    self.last_phase = msg
                    if self.listener is not None:
                        self.listener.phase(msg)
                    continue
            except (EOFError, OSError):
                pass
            if self.listener is not None:
                self.listener.tick()
            if not self.proc.is_alive():
                # The reply may have been sent just before the exit.
                try:
                    if self.conn.poll(0):
                        return self.conn.recv()
                except (EOFError, OSError):
                    pass
                self.proc.join(5)
                code = self.proc.exitcode
                detail = _tail(self.log_path) if self.log_path else ""
                raise WorkerFailure("crash", f"worker process died while {what} ({describe_signal(code)})"
                                    f"{self._in_phase()}", detail, "WorkerDied")
            if time.monotonic() > deadline:
                self._kill()
                detail = _tail(self.log_path) if self.log_path else ""
                raise WorkerFailure("timeout", f"{what} took longer than {timeout_s:g} s{self._in_phase()}; "
                                    f"worker killed", detail, "Timeout")

    def request(self, msg: dict[str, Any], timeout_s: float, what: str) -> dict[str, Any]:
        """Send one command and wait for its reply; WorkerFailure (worker replaced next time) on failure."""
        self.ensure()
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            self.close()
            self.ensure()
            self.conn.send(msg)
        try:
            reply = self._wait(timeout_s, what)
        except WorkerFailure:
            self.close()
            raise
        if reply.get("type") == "error":
            self.close()  # a fresh process for whatever comes next
            raise WorkerFailure(reply.get("reason", "error"), reply.get("message", ""), reply.get("traceback", ""),
                                reply.get("error_type", ""))
        return reply

    def close(self) -> None:
        """Ask the worker to stop; kill it if it does not."""
        if self.proc is None:
            return
        try:
            if self.proc.is_alive():
                try:
                    self.conn.send({"cmd": "stop"})
                except (BrokenPipeError, OSError):
                    pass
                self.proc.join(5)
            self._kill()
        finally:
            try:
                self.conn.close()
            except OSError:
                pass
            self.proc = self.conn = None
            self.info = None


# ======================================================================================================
# worker side
# ======================================================================================================
def _redirect_output(log_path: str) -> Any:
    fh = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    faulthandler.enable(file=fh, all_threads=True)
    return fh


def _error_reply(exc: BaseException, number: int | None = None) -> dict[str, Any]:
    return {
        "type": "error",
        "number": number,
        "reason": classify_exception(exc),
        "error_type": f"{type(exc).__module__}.{type(exc).__name__}",
        "message": (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500],
        "traceback": "".join(traceback.format_exception(exc))[-LOG_TAIL_CHARS:],
    }


def remeasure_default(default_s: list[float], candidate_s: list[float]) -> bool:
    """Whether the confirmation round measures the default again right before a candidate, given the
    seconds its measurements took so far: only where that costs no more than the candidate's own
    measurement (median). A default far slower than the candidates (7B's step-block default: ~35 s
    against ~3 s) would otherwise take most of the round; it is then measured once per round."""
    if not default_s or not candidate_s:
        return True
    return default_s[-1] <= statistics.median(candidate_s)


class _Session:
    """Everything a worker keeps between trials: the model, prompts, the reference outputs."""

    def __init__(self, setup: dict[str, Any], notify: Any = None) -> None:
        """`notify(stage, detail)` tells the parent what the worker is doing (the phase messages)."""
        from xlstm_tune.bench.harness import (
            BenchSettings,
            load_reference,
            memory_guard,
            reference_outputs,
            save_reference,
        )
        from xlstm_tune.bench.workload import PromptSource, describe_model, open_model, prompt_ids, where

        from xlstm_tune.runtime.settings import RuntimeSettings

        t0 = time.perf_counter()
        self.setup = setup
        self.notify = notify or (lambda stage, detail: None)
        self.notify("loading the model", f"{setup['model']} on {setup['device']}, {setup['dtype']}")
        # Threads and kernel switches first: torch fixes its inter-op pool at the first parallel work.
        self.runtime = {"compile": bool(setup["compile"]), **RuntimeSettings(
            dtype=setup["dtype"], **setup.get("runtime", {})).apply(setup["device"], setup.get("concurrent", 1))}
        self.watchdog_config = memory_guard("cpu").config  # XLSTM_MEM_* checked once, up front
        self.model_info = describe_model(setup["model"])
        self.compile = bool(setup["compile"])
        self.model = open_model(setup["model"], device=setup["device"], dtype=setup["dtype"], compile=self.compile,
                                seed=setup.get("model_seed", 0))
        self.source = PromptSource(text=setup.get("prompt_text"), origin=setup.get("prompt_origin", "synthetic"),
                                   seed=setup.get("prompt_seed", 0))
        self.settings = BenchSettings(**setup["bench"])
        self.lengths = list(setup["context_lens"])
        self.new_tokens = int(setup["new_tokens"])
        self.decode_len = setup.get("decode_context_len") or min(self.lengths)
        self.batch_size = int(setup.get("batch_size", 1))
        self.prompts: dict[int | None, Any] = {n: prompt_ids(self.model, n, self.source)
                                               for n in set(self.lengths) | {self.decode_len}}
        fid = setup["fidelity"]
        self.fid_ids = prompt_ids(self.model, int(fid["prompt_len"]), self.source)
        meta = {"model": setup["model"], "config_hash": self.model_info["config_hash"], "dtype": setup["dtype"],
                "device": str(self.model.device), "seed": setup.get("model_seed", 0),
                "prompt": self.source.origin, "prompt_seed": self.source.seed, "prompt_len": fid["prompt_len"],
                "decode_steps": fid["decode_steps"]}
        cached = load_reference(setup["reference_path"], meta)
        ref_s = 0.0
        if cached is None:
            self.notify("reference outputs", "the canonical path, once per study")
            r0 = time.perf_counter()
            logits, tokens = reference_outputs(self.model, self.fid_ids, int(fid["decode_steps"]))
            ref_s = time.perf_counter() - r0
            save_reference(setup["reference_path"], logits, tokens, meta)
            cached = (logits, tokens)
        self.ref_logits, self.ref_tokens = cached
        self.outputs = Path(setup["outputs_dir"])
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.device = self.model.device
        summary = where(self.model)
        self.info = {
            "pid": os.getpid(),
            "device": str(self.device),
            "device_summary": summary,
            "model": self.model_info,
            "model_id": self.model.model_id,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "load_s": time.perf_counter() - t0,
            "reference_s": ref_s,
            "reference_cached": ref_s == 0.0,
            "runtime": self.runtime,
            "decode_prompt_text": self.model.decode(self.prompts[self.decode_len][0].tolist())[:20000],
        }

    # ---- pieces ------------------------------------------------------------------------------
    def _options(self, knobs: dict[str, Any]) -> Any:
        from xlstm_tune.runtime.options import RuntimeOptions

        return RuntimeOptions(**knobs, compile=self.compile)

    def _fidelity(self, stage: str = "fidelity") -> dict[str, Any]:
        from xlstm_tune.bench.harness import candidate_outputs
        from xlstm_tune.quality.fidelity import fidelity_metrics, fidelity_passed

        fid = self.setup["fidelity"]
        self.notify(stage, f"{int(self.fid_ids.shape[-1])}-token prompt, {len(self.ref_tokens)} decode steps")
        out = candidate_outputs(self.model, self.fid_ids, self.ref_tokens)
        metrics = fidelity_metrics(out, self.ref_logits)
        passed = fidelity_passed(metrics, float(fid["rel_tol"]), fid.get("min_greedy_agreement"))
        return {**metrics, "passed": bool(passed), "rel_tol": float(fid["rel_tol"]),
                "min_greedy_agreement": fid.get("min_greedy_agreement"),
                "prompt_len": int(self.fid_ids.shape[-1]), "decode_steps": len(self.ref_tokens)}

    def _quality(self, tokens: Any) -> dict[str, Any]:
        """Text metrics and perplexity under the canonical path, once per distinct continuation.

        Feasible configurations produce the same greedy tokens, so the (slow, step-by-step) canonical
        forward runs about once per study, not once per trial.
        """
        from xlstm_tune.quality.continuation import score_continuation
        from xlstm_tune.quality.text_metrics import text_metrics

        ids = [int(t) for t in (tokens.flatten().tolist() if hasattr(tokens, "flatten") else tokens)]
        key = tuple(ids)
        cache = self.__dict__.setdefault("_quality_cache", {})
        if key not in cache:
            self.notify("quality", "scoring the continuation")
            if self.setup.get("quality", {}).get("perplexity", True) and ids:
                import torch

                cont = torch.tensor([ids], dtype=torch.long, device=self.device)
                cache[key] = score_continuation(self.model, self.prompts[self.decode_len], cont)
            else:
                cache[key] = text_metrics(ids)
        return dict(cache[key])

    # ---- commands ----------------------------------------------------------------------------
    def trial(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Measure one configuration in stages (study.pruning), stopping early when the study says so.

        `msg["prune"]`: the study's pruning limits (None: measure everything); `msg["time_limit_s"]`:
        the study's time limit for this trial, checked after each stage. A stopped trial replies with
        `state` PRUNED, the stage it stopped after, the reason and the figures measured so far; fidelity
        runs only for a trial that was measured to the end (only those can become best).
        """
        from xlstm_tune.bench.harness import memory_guard, run_benchmark, write_decode_csv
        from xlstm_tune.study import pruning
        from xlstm_tune.study.faults import inject

        number = int(msg["number"])
        t0 = time.perf_counter()
        limits, time_limit = msg.get("prune"), msg.get("time_limit_s")
        stage_s: dict[str, float] = {}
        figures: dict[str, Any] = {}
        stage_figures: dict[str, dict[str, float]] = {}  # what each stage measured (replay re-applies the rule)
        stopped: dict[str, Any] = {}
        mark = [time.perf_counter()]

        def on_stage(stage: str, result: Any) -> bool:
            now = time.perf_counter()
            stage_s[stage] = now - mark[0]
            mark[0] = now
            figures.update(result.flat())
            stage_figures[stage] = pruning.stage_figures(result.flat())
            if stage == pruning.STAGE_DECODE:
                return True
            why = pruning.verdict(limits, figures, stage)
            reason = pruning.PRUNED_REASON
            if why is None:
                why, reason = pruning.slow_reason(now - t0, time_limit), pruning.SLOW_REASON
            if why is None:
                return True
            stopped.update(stage=stage, reason=reason, why=why)
            return False

        options = self._options(msg["knobs"])
        with memory_guard(self.device, self.watchdog_config) as wd:
            self.model.runtime = options
            if msg.get("fault"):
                self.notify("fault injection", str(msg["fault"]))
                ids = self.prompts[min(self.lengths)]
                inject(msg["fault"], device=self.device, busy_work=lambda: self.model(ids))
            mark[0] = time.perf_counter()
            report = run_benchmark(self.model, sorted(self.lengths), self.source, self.new_tokens, self.settings,
                                   decode_context_len=self.decode_len, model_info=self.model_info,
                                   prompts=self.prompts, batch_size=self.batch_size,
                                   on_stage=on_stage, on_phase=self.notify)  # shortest context first
            fidelity: dict[str, Any] = {}
            if not stopped:
                f0 = time.perf_counter()
                fidelity = self._fidelity()
                stage_s["fidelity"] = time.perf_counter() - f0
        warm = sum(p.first_call_s for p in report.prefill) + (report.decode.first_call_s if report.decode else 0.0)
        measure = sum(v for k, v in stage_s.items() if k != "fidelity")
        phases = {"compile_s": warm, "measure_s": max(0.0, measure - warm), "fidelity_s": stage_s.get("fidelity", 0.0)}
        metrics = {**report.flat(), "threads": self.runtime["threads"], "interop_threads": self.runtime["interop_threads"]}
        common = {"number": number, "metrics": metrics, "runtime": self.runtime, "stats": {f"ctx{p.context_len}": p.stats for p in report.prefill},
                  "flags": report.flags, "peak_mem_mb": wd.peak_used_mb, "worker_pid": os.getpid(),
                  "stage_s": stage_s, "stage_figures": stage_figures, "phases": phases}
        if stopped:
            return {"type": "result", "state": "PRUNED", **common, "pruned_stage": stopped["stage"],
                    "prune_reason": stopped["why"], "failure_reason": stopped["reason"],
                    "duration_s": time.perf_counter() - t0}
        outputs: dict[str, str] = {}
        if report.decode is not None:
            text_path = self.outputs / f"trial_{number}.txt"
            write_text_atomic(text_path, self.model.decode(report.decode.tokens))
            csv_path = write_decode_csv(self.outputs / f"trial_{number}_decode.csv", report.decode.steps)
            outputs = {"continuation": str(text_path), "decode_csv": str(csv_path)}
        quality = self._quality(report.decode.tokens) if report.decode is not None else {}
        return {"type": "result", "state": "COMPLETE", **common, "fidelity": fidelity, "outputs": outputs,
                "quality": quality, "duration_s": time.perf_counter() - t0}

    def confirm(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Interleaved re-measurement: per round D, C1, D, C2, ..., D, Ck (candidate order rotates), except
        that the default is measured again before a candidate only where its measurement costs no more than
        that candidate's; a slow default is measured once per round (D, C1, C2, ..., Ck).

        Besides each configuration's pooled samples, `pairs` keeps every candidate measurement with the
        default's latest measurement of the same round (right before it, or at the round's start): the
        paired statistics of `study.significance` need the pairing that pooling loses.
        """
        from xlstm_tune.bench.harness import BenchSettings, run_benchmark

        configs = msg["configs"]
        default, candidates = configs[0], configs[1:]
        # busy_retries=0: the pairing with the default measured next to it cancels the machine's load
        settings = BenchSettings(warmup=0, repeats=int(msg.get("repeats", 1)), max_cv=1e9, max_rounds=1, busy_retries=0)
        results: dict[str, dict[str, Any]] = {
            c["key"]: {"prefill": {str(n): [] for n in self.lengths}, "decode": [], "fidelity": None, "error": None}
            for c in configs
        }
        sequence: list[str] = []
        pairs: list[dict[str, Any]] = []
        took: dict[str, list[float]] = {c["key"]: [] for c in configs}  # seconds of each measurement
        rounds = int(msg["rounds"])
        t0 = time.perf_counter()

        def measure(cfg: dict[str, Any], r: int, who: str) -> dict[str, Any] | None:
            res = results[cfg["key"]]
            if res["error"] is not None:
                return None
            stage = f"confirmation round {r + 1}/{rounds}"
            try:
                self.notify(stage, who)
                self.model.runtime = self._options(cfg["knobs"])
                if res["fidelity"] is None:
                    res["fidelity"] = self._fidelity(stage=f"{stage}, fidelity of {who}")
                m0 = time.perf_counter()
                rep = run_benchmark(self.model, self.lengths, self.source, self.new_tokens, settings,
                                    decode_context_len=self.decode_len, model_info=self.model_info,
                                    prompts=self.prompts, record_steps=False, batch_size=self.batch_size)
                took[cfg["key"]].append(time.perf_counter() - m0)
            except Exception as exc:  # one candidate's failure must not lose the others
                res["error"] = _error_reply(exc)
                return None
            measurement = {"prefill": {str(p.context_len): list(p.tok_s.samples) for p in rep.prefill},
                           "decode": list(rep.decode.tok_s.samples) if rep.decode is not None else []}
            for n, samples in measurement["prefill"].items():
                res["prefill"][n].extend(samples)
            res["decode"].extend(measurement["decode"])
            sequence.append(cfg["key"])
            return measurement

        def default_again(cand: dict[str, Any]) -> bool:
            mine = took[cand["key"]] or [t for c in candidates for t in took[c["key"]]]
            return remeasure_default(took[default["key"]], mine)

        for r in range(rounds):
            shift = r % len(candidates) if candidates else 0
            order = candidates[shift:] + candidates[:shift]
            before: dict[str, Any] | None = None  # this round's latest measurement of the default
            if not order:
                measure(default, r, "the default")
            for i, cand in enumerate(order):
                if i == 0 or before is None or default_again(cand):
                    before = measure(default, r, "the default") or before
                measurement = measure(cand, r, f"candidate {cand['key']}")
                if measurement is not None and before is not None:
                    pairs.append({"round": r, "key": cand["key"], "default": before, "candidate": measurement})
        return {"type": "result", "configs": results, "sequence": sequence, "pairs": pairs,
                "duration_s": time.perf_counter() - t0}


def _exit_with_parent(parent_pid: int) -> None:
    """Leave as soon as the study process is gone (even mid-trial): a killed study leaves no worker."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(3)

    threading.Thread(target=watch, name="xlstm-parent-watch", daemon=True).start()


def worker_main(conn: Any, setup: dict[str, Any]) -> None:
    """Entry point of the worker process (spawned by TrialWorker.start)."""
    _exit_with_parent(os.getppid())
    log = _redirect_output(setup["log_path"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.setpgid(0, 0)  # own process group: a timeout kill takes the worker's children too
    except (AttributeError, OSError):
        pass
    print(f"[xlstm_tune worker {os.getpid()}] starting: {setup.get('model')} on {setup.get('device')}", flush=True)
    current: dict[str, Any] = {"number": None}

    def notify(stage: str, detail: str) -> None:
        conn.send({"type": "phase", "number": current["number"], "stage": stage, "detail": detail})

    try:
        session = _Session(setup, notify)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, none is raised into nothing
        traceback.print_exc()
        reply = _error_reply(exc)
        reply["type"] = "fatal"
        try:
            conn.send(reply)
        finally:
            log.flush()
        return
    conn.send({"type": "ready", "info": session.info})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        cmd = msg.get("cmd")
        if cmd == "stop":
            session.model.close()
            return
        number = msg.get("number")
        current["number"] = number
        print(f"[xlstm_tune worker {os.getpid()}] {cmd} {number if number is not None else ''} {msg.get('knobs', '')}",
              flush=True)
        try:
            if cmd == "trial":
                reply = session.trial(msg)
            elif cmd == "confirm":
                reply = session.confirm(msg)
            else:
                raise ValueError(f"unknown worker command {cmd!r}")
        except BaseException as exc:  # noqa: BLE001 - classified and sent back; the parent replaces us
            traceback.print_exc()
            reply = _error_reply(exc, number)
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
