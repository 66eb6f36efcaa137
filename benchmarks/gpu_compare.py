"""Our paths against the reference implementations and the roofline, in one run.

    python benchmarks/gpu_compare.py                         # CUDA: xlstm-350m and xlstm-7b, bf16
    python benchmarks/gpu_compare.py --device cpu            # CPU: tiny and xlstm-20m, float32
    python benchmarks/gpu_compare.py --models xlstm-7b --targets ours:native-c128,ref:triton \
        --decode-batch 1,8,16 --no-prefill                   # batched decode only, ours against Triton

Every (model, target) pair runs in its own subprocess (a fresh process per model keeps memory and
compile caches from leaking between measurements, and a crash or timeout costs one row, not the run).
Targets: our default configuration, our best configuration of each backend, and the references:
`transformers`' xLSTMForCausalLM on its native PyTorch path (run without the `xlstm` package importable,
so transformers uses its own code) and the `xlstm` package's model on `mlstm_kernels` Triton kernels
(`chunkwise--triton_limit_chunk`, `native_sequence__triton`, step `triton`; CUDA only).

Prefill: tok/s over a full prompt (batch 1), median of repeats after a warm-up call. Decode: 128 greedy
tokens from a short prompt, after a warm-up generation (compile and graph capture excluded; the warm-up
time is reported separately). The roofline (device copy bandwidth, bf16/fp32 matmul rate) is measured
in the same run and turned into per-model limits: prefill = matmul rate / (2 × weights), decode =
bandwidth / weight bytes.

Batched decode (`--decode-batch 1,8,16`): every target decodes B different prompts together at each B,
one B after the other inside its worker (graph capture per B in the warm-up); tok/s = B × tokens / time.
The table gives each B's tok/s, its ratio to the same target's batch 1, to the Triton reference at the
same B, and to the bandwidth limit at B: each step reads the weights once and every sequence's float32
state twice (read and write), so limit(B) = B × bandwidth / (weight bytes + 2 × B × state bytes).
A batch size that fails in a worker (e.g. out of memory) costs that cell, not the row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

OUR_CONFIGS = {
    # name: RuntimeOptions fields
    "default": {},
    "native": dict(backend="native", chunk_size=64, compile=True, decode_mode="graph"),
    "native-c128": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph"),
    "native-c256": dict(backend="native", chunk_size=256, compile=True, decode_mode="graph"),
    "native-c128-no-gemv": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph",
                                _env={"XLSTM_FUSED_DECODE": "0", "XLSTM_TRITON_GEMV": "0"}),  # A/B: framework GEMM in decode
    "native-c128-unfused": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph",
                                _env={"XLSTM_FUSED_DECODE": "0"}),  # A/B: captured compiled step, Triton GEMV
    "native-c128-no-pdl": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph",
                               _env={"XLSTM_DECODE_PDL": "0"}),  # A/B: decode kernels without dependent launch
    "native-c128-ieee-cell": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph",
                                  _env={"XLSTM_TF32_CELL": "0"}),  # A/B: float32 cell products without TF32
    "native-c128-prefill-graph": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph",
                                      _env={"XLSTM_PREFILL_GRAPH": "1"}),  # prefill replayed from a device graph
    "native-compiled-decode": dict(backend="native", chunk_size=64, compile=True, decode_mode="compiled"),
    "queued-streams": dict(backend="queued", chunk_size=64, t_inner=16, heads_per_band=2, workers=4, streams=4,
                           compile=True, decode_mode="graph"),
    "ray": dict(backend="ray", chunk_size=64, t_inner=16, heads_per_band=2, compile=True, decode_mode="graph"),
}
CPU_CONFIGS = {
    "default": dict(compile=False),
    "native": dict(backend="native", chunk_size=64, compile=False, decode_mode="eager"),
    "native-compiled": dict(backend="native", chunk_size=64, compile=True, decode_mode="compiled"),
    "queued": dict(backend="queued", chunk_size=32, t_inner=4, heads_per_band=1, workers=2, compile=False),
}
REF_SHAPES = {  # the presets' shapes, for the reference models
    "xlstm-7b": dict(hidden_size=4096, num_hidden_layers=32, num_heads=8, vocab_size=50304),
    "xlstm-350m": dict(hidden_size=1024, num_hidden_layers=24, num_heads=4, vocab_size=50304),
    "xlstm-20m": dict(hidden_size=384, num_hidden_layers=8, num_heads=4, vocab_size=4096),
    "tiny": dict(hidden_size=128, num_hidden_layers=3, num_heads=2, vocab_size=256),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------- roofline
def roofline(device: str, dtype: torch.dtype) -> dict:
    n_bytes = (2 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = statistics.median(timed(lambda: dst.copy_(src), device, 10))
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    mm_s = statistics.median(timed(lambda: a @ b, device, 10))
    return {"copy_gb_s": 2 * n_bytes / copy_s / 1e9, "matmul_tflop_s": 2 * n ** 3 / mm_s / 1e12}


# ------------------------------------------------------------------------------------------- workers
def _measure(prefill, step_decode, lengths, new_tokens, repeats, device, vocab, batches=(1,)) -> dict:
    """prefill(ids) and step_decode(n_tokens, batch) callables; returns tok/s figures.

    Decode is measured at every batch size in `batches` (`decode_tok_s@b<B>`, B x tokens per call);
    `decode_tok_s` is batch 1's. A batch size that raises records `decode_error@b<B>` and the rest go on.
    """
    res: dict = {}
    for L in lengths:
        ids = torch.randint(0, vocab, (1, L), device=device)
        t0 = time.perf_counter()
        prefill(ids)
        sync(device)
        res[f"warmup_prefill_s@{L}"] = time.perf_counter() - t0
        times = timed(lambda: prefill(ids), device, repeats)
        res[f"prefill_tok_s@{L}"] = L / statistics.median(times)
        res[f"prefill_cv@{L}"] = statistics.pstdev(times) / statistics.mean(times)
    for b in batches:
        sfx = "" if b == 1 else f"@b{b}"
        try:
            t0 = time.perf_counter()
            step_decode(8, b)
            sync(device)
            res["warmup_decode_s" + sfx] = time.perf_counter() - t0
            times = timed(lambda: step_decode(new_tokens, b), device, max(1, repeats - 1))
        except Exception as exc:  # e.g. out of memory at a large batch: that cell fails, the row goes on
            res[f"decode_error@b{b}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        res[f"decode_tok_s@b{b}"] = b * new_tokens / statistics.median(times)
        res[f"decode_cv@b{b}"] = statistics.pstdev(times) / statistics.mean(times)
    if "decode_tok_s@b1" in res:
        res["decode_tok_s"] = res["decode_tok_s@b1"]
    return res


def _prompts(vocab: int, device: str):
    """Batch size -> [B, 16] prompt ids, made once per B (rows differ), so every call of a B decodes the same."""
    cache: dict = {}

    def of(batch: int):
        if batch not in cache:
            cache[batch] = torch.randint(0, vocab, (batch, 16), device=device)
        return cache[batch]
    return of


def worker_ours(model_name: str, config: dict, args) -> dict:
    sys.path.insert(0, str(REPO))
    from xlstm_tune import RuntimeOptions, load_model

    opts = dict(config)
    os.environ.update(opts.pop("_env", {}))  # before load: the model picks its decode GEMV at load
    t0 = time.perf_counter()
    model = load_model(model_name, device=args.device, dtype=args.dtype, runtime=RuntimeOptions(backend="native", compile=False))
    load_s = time.perf_counter() - t0
    if "heads_per_band" not in opts:
        opts["heads_per_band"] = min(4, model.config.num_heads)
    model.runtime = RuntimeOptions(**opts)
    prompt_of = _prompts(model.config.vocab_size, args.device)
    prefilled: dict = {}  # batch -> state after its prompt (prefill is not part of the decode figure)
    decode_paths: dict = {}

    def decode_only(n: int, batch: int) -> None:  # time the decode steps alone: prefill of 16 tokens is untimed
        if batch not in prefilled:
            prefilled[batch] = model(prompt_of(batch))[1]
        model.generate(prompt_of(batch)[:, -1:], max_new_tokens=n,
                       state=[tuple(t.clone() for t in b) for b in prefilled[batch]])
        decode_paths[batch] = model.decode_path

    res = _measure(lambda ids: model(ids), decode_only, args.lengths, args.new_tokens, args.repeats, args.device,
                   model.config.vocab_size, args.decode_batch)
    if args.lengths:
        model.stats.reset()
        model(torch.randint(0, model.config.vocab_size, (1, args.lengths[0]), device=args.device))
        res["kernel_paths"] = dict(model.stats.kernel_paths)
        res["cell_products"] = sorted(model.stats.cell_products)
        res["prefill_paths"] = dict(model.stats.prefill_paths)  # what that prefill ran: call or graph:replay
    res["decode_path"] = decode_paths.get(1, model.decode_path)
    res.update({f"decode_path@b{b}": p for b, p in decode_paths.items() if b != 1})
    res["load_s"] = load_s
    res["params"] = sum(p.numel() for p in model.net.parameters())
    res["options"] = model.runtime.to_dict()
    model.close()
    return res


def _hf_config(model_name: str):
    from transformers import xLSTMConfig

    return xLSTMConfig(**REF_SHAPES[model_name], mode="inference", chunkwise_kernel="chunkwise--native_autograd",
                       sequence_kernel="native_sequence__native", step_kernel="native", chunk_size=64,
                       autocast_kernel_dtype="bfloat16", inference_state_dtype="float32", return_last_states=True)


def _randomize(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)


# transformers renamed the xLSTM cache (`cache_params` -> `cache`) between 5.17 and 5.24: accept both.
_CACHE_KW = "cache"


def _cache_of(out):
    global _CACHE_KW
    if getattr(out, "cache", None) is not None:
        return out.cache
    _CACHE_KW = "cache_params"
    return out.cache_params


def worker_transformers(model_name: str, args) -> dict:
    import transformers
    from transformers.utils import is_xlstm_available

    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    with torch.device(args.device):
        model = transformers.xLSTMForCausalLM(_hf_config(model_name)).eval()
    torch.set_default_dtype(torch.float32)
    _randomize(model)
    prompt_of = _prompts(model.config.vocab_size, args.device)

    @torch.no_grad()
    def prefill(ids):
        return model(ids, use_cache=True)

    @torch.no_grad()
    def decode(n: int, batch: int) -> None:
        out = model(prompt_of(batch), use_cache=True)
        cache, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            out = model(tok, **{_CACHE_KW: cache}, use_cache=True)
            cache, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)

    res = _measure(prefill, decode, args.lengths, args.new_tokens, args.repeats, args.device, model.config.vocab_size,
                   args.decode_batch)
    res["path"] = "transformers native" + (" (WARNING: external xlstm importable)" if is_xlstm_available() else "")
    res["transformers_version"] = transformers.__version__
    return res


def worker_triton(model_name: str, args) -> dict:
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    shape = REF_SHAPES[model_name]
    cfg = xLSTMLargeConfig(embedding_dim=shape["hidden_size"], num_heads=shape["num_heads"], num_blocks=shape["num_hidden_layers"],
                           vocab_size=shape["vocab_size"], chunkwise_kernel="chunkwise--triton_limit_chunk",
                           sequence_kernel="native_sequence__triton", step_kernel="triton", mode="inference",
                           chunk_size=64, return_last_states=True, autocast_kernel_dtype="bfloat16", inference_state_dtype="float32")
    torch.set_default_dtype(getattr(torch, args.dtype))
    with torch.device(args.device):
        model = xLSTMLarge(cfg).eval()
    torch.set_default_dtype(torch.float32)
    _randomize(model)
    prompt_of = _prompts(cfg.vocab_size, args.device)

    @torch.no_grad()
    def prefill(ids):
        return model(ids)

    @torch.no_grad()
    def decode(n: int, batch: int) -> None:  # the reference's own step kernel over B rows (state [B, ...])
        logits, state = model(prompt_of(batch))
        tok = logits[:, -1:].argmax(-1)
        for _ in range(n):
            logits, state = model(tok, state)
            tok = logits[:, -1:].argmax(-1)

    res = _measure(prefill, decode, args.lengths, args.new_tokens, args.repeats, args.device, cfg.vocab_size,
                   args.decode_batch)
    res["path"] = "xlstm + mlstm_kernels triton_limit_chunk"
    return res


# ------------------------------------------------------------------------------------------ driver
def run_worker(target: str, model_name: str, args, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", target, "--models", model_name, "--device", args.device, "--dtype", args.dtype,
           "--lengths", ",".join(map(str, args.lengths)) or "none", "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--decode-batch", ",".join(map(str, args.decode_batch))]
    env = {**os.environ, **(env_extra or {}), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {args.worker_timeout} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-400:]}
    res = json.loads(lines[-1][7:])
    res["wall_s"] = time.perf_counter() - t0
    return res


def weights_of(model_name: str) -> int:
    return sum(p.numel() for p in _meta_model(model_name).parameters())


def state_bytes_of(model_name: str) -> int:
    """Bytes of one sequence's decode state (float32 mLSTM C, n, m; sLSTM states in their dtypes)."""
    sys.path.insert(0, str(REPO))
    from xlstm_tune.model.xlstm import state_nbytes

    return state_nbytes(_meta_model(model_name).init_state(1, torch.device("meta")))


def _meta_model(model_name: str):
    sys.path.insert(0, str(REPO))
    from xlstm_tune.model.loading import _empty_model
    from xlstm_tune.model.presets import PRESETS

    return _empty_model(PRESETS[model_name], torch.device("meta"), torch.float32)


def decode_limit(bandwidth_gb_s: float, weight_bytes: int, state_bytes: int, batch: int) -> float:
    """tok/s at the bandwidth limit for `batch` sequences: weights read once per step, each state read and written."""
    return batch * bandwidth_gb_s * 1e9 / (weight_bytes + 2 * batch * state_bytes)


def parse_batches(text: str) -> list[int]:
    """`--decode-batch 1,8,16` -> [1, 8, 16] (argparse turns the error into one line and exit 2)."""
    try:
        batches = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        batches = []
    if not batches or batches[0] < 1:
        raise argparse.ArgumentTypeError(f"takes positive integers like 1,8,16, got {text!r}")
    return batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--models", default=None)
    ap.add_argument("--lengths", default=None, help="prefill lengths, e.g. 2048,8192 (default: 2048,8192 on CUDA)")
    ap.add_argument("--no-prefill", action="store_true", help="measure decode only (no prefill rows)")
    ap.add_argument("--decode-batch", type=parse_batches, default=[1], metavar="B[,B...]",
                    help="decode batch sizes, e.g. 1,8,16: every target decodes B prompts together at each B (default 1)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", default=None, help="comma list of ours:<config> / ref:transformers / ref:triton")
    ap.add_argument("--worker-timeout", type=int, default=420)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    lengths_text = "none" if args.no_prefill else (args.lengths or ("2048,8192" if gpu else "256,1024"))
    args.lengths = [] if lengths_text == "none" else [int(x) for x in lengths_text.split(",")]
    args.new_tokens = args.new_tokens or (128 if gpu else 32)
    models = (args.models or ("xlstm-350m,xlstm-7b" if gpu else "tiny,xlstm-20m")).split(",")
    configs = OUR_CONFIGS if gpu else CPU_CONFIGS

    if args.worker:  # ------------------------------------------------------------ inside a subprocess
        kind, _, name = args.worker.partition(":")
        if kind == "ours":
            res = worker_ours(models[0], configs[name], args)
        elif name == "transformers":
            res = worker_transformers(models[0], args)
        else:
            res = worker_triton(models[0], args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    targets = (args.targets or ",".join([f"ours:{c}" for c in configs] + ["ref:transformers"] + (["ref:triton"] if gpu else []))).split(",")
    known = [f"ours:{c}" for c in configs] + ["ref:transformers", "ref:triton"]
    for target in targets:
        if target not in known:
            ap.error(f"--targets: unknown target {target!r}; known here: {', '.join(known)}")
    dev_name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device: {dev_name}  torch {torch.__version__}  dtype {args.dtype}  date {time.strftime('%Y-%m-%d')}", flush=True)
    roof = roofline(args.device, getattr(torch, args.dtype))
    print(f"roofline: copy {roof['copy_gb_s']:.0f} GB/s, matmul {roof['matmul_tflop_s']:.1f} TFLOP/s", flush=True)
    # The transformers reference must not see the `xlstm` package (it would switch to it).
    no_xlstm = {"PYTHONPATH": os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "xlstm_ref" not in p)}
    results: dict = {"device": dev_name, "torch": torch.__version__, "dtype": args.dtype, "roofline": roof,
                     "decode_batches": args.decode_batch, "new_tokens": args.new_tokens, "rows": []}
    for model_name in models:
        n_params = weights_of(model_name)
        bytes_per = 2 if args.dtype in ("bfloat16", "float16") else 4
        state_bytes = state_bytes_of(model_name)
        limit = {"prefill": roof["matmul_tflop_s"] * 1e12 / (2 * n_params), "decode": roof["copy_gb_s"] * 1e9 / (n_params * bytes_per),
                 "state_bytes": state_bytes,
                 **{f"decode@b{b}": decode_limit(roof["copy_gb_s"], n_params * bytes_per, state_bytes, b) for b in args.decode_batch}}
        if args.decode_batch != [1]:
            print(f"  {model_name}: state {state_bytes / 2**20:,.1f} MiB per sequence; decode limit "
                  + ", ".join(f"b{b} {limit[f'decode@b{b}']:,.0f}" for b in args.decode_batch) + " tok/s", flush=True)
        for target in targets:
            env = no_xlstm if target == "ref:transformers" else None
            res = run_worker(target, model_name, args, env)
            row = {"model": model_name, "target": target, **res, "limit": limit}
            results["rows"].append(row)
            brief = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items()
                     if "tok_s" in k or k.startswith(("decode_error", "decode_path"))
                     or k in ("error", "warmup_decode_s", "cell_products")}
            print(f"  {model_name:11s} {target:28s} {brief}", flush=True)
    print_table(results, args.lengths)
    if args.decode_batch != [1]:
        print_batch_table(results, args.decode_batch)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict, lengths: list[int]) -> None:
    print()
    cols = [f"prefill@{L}" for L in lengths] + ["decode"]
    print(f"| model | target | " + " | ".join(cols) + " | " + " | ".join(f"{c} vs transformers" for c in cols)
          + " | decode vs triton | % of roofline (prefill@max, decode) |")
    print("|" + "---|" * (4 + 2 * len(cols) + 0))
    by = {(r["model"], r["target"]): r for r in results["rows"]}
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['model']} | {r['target']} | error: {r['error'][:120]} |")
            continue
        vals = [r.get(f"prefill_tok_s@{L}") for L in lengths] + [r.get("decode_tok_s")]
        ref = by.get((r["model"], "ref:transformers"), {})
        tri = by.get((r["model"], "ref:triton"), {})
        ref_vals = [ref.get(f"prefill_tok_s@{L}") for L in lengths] + [ref.get("decode_tok_s")]
        ratios = [f"{v / rv:.2f}x" if v and rv else "-" for v, rv in zip(vals, ref_vals)]
        tri_dec = f"{vals[-1] / tri['decode_tok_s']:.2f}x" if vals[-1] and tri.get("decode_tok_s") else "-"
        pre_roof = f"{100 * vals[-2] / r['limit']['prefill']:.0f}%" if lengths and vals[-2] else "-"
        dec_roof = f"{100 * vals[-1] / r['limit']['decode']:.0f}%" if vals[-1] else "-"
        roof = f"{pre_roof}, {dec_roof}"
        print(f"| {r['model']} | {r['target']} | " + " | ".join(f"{v:,.0f}" if v else "-" for v in vals) + " | "
              + " | ".join(ratios) + f" | {tri_dec} | {roof} |")



def print_batch_table(results: dict, batches: list[int]) -> None:
    """Batched decode: per B, tok/s, ratio to the target's batch 1, ratio to the Triton reference at the same
    B, and the share of the bandwidth limit at B (weights once per step + every sequence's state)."""
    print()
    print("batched decode: tok/s (x own batch 1, x Triton at the same batch, % of the bandwidth limit at that batch)")
    print("| model | target | " + " | ".join(f"b{b}" for b in batches) + " |")
    print("|" + "---|" * (2 + len(batches)))
    by = {(r["model"], r["target"]): r for r in results["rows"]}
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['model']} | {r['target']} | error: {r['error'][:120]} |")
            continue
        tri = by.get((r["model"], "ref:triton"), {})
        b1 = r.get("decode_tok_s@b1")
        cells = []
        for b in batches:
            v = r.get(f"decode_tok_s@b{b}")
            if not v:
                cells.append("error: " + str(r.get(f"decode_error@b{b}", "not measured"))[:60])
                continue
            tv = tri.get(f"decode_tok_s@b{b}")
            parts = [f"{v / b1:.2f}x b1" if b1 else "- b1", f"{v / tv:.2f}x tri" if tv else "- tri",
                     f"{100 * v / r['limit'][f'decode@b{b}']:.0f}%"]
            path = r.get(f"decode_path@b{b}")
            cells.append(f"{v:,.1f} ({', '.join(parts)})" + (f" [{path}]" if path and b != 1 else ""))
        print(f"| {r['model']} | {r['target']} | " + " | ".join(cells) + " |")
    limits = {r["model"]: r["limit"] for r in results["rows"] if "limit" in r}
    for model, limit in limits.items():
        print(f"| {model} | bandwidth limit | " + " | ".join(f"{limit[f'decode@b{b}']:,.1f}" for b in batches) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
