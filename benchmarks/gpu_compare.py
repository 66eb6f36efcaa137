"""Our paths against the reference implementations and the roofline, in one run.

    python benchmarks/gpu_compare.py                         # CUDA: xlstm-350m and xlstm-7b, bf16
    python benchmarks/gpu_compare.py --device cpu            # CPU: tiny and xlstm-20m, float32

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
    "native-c128-ieee-cell": dict(backend="native", chunk_size=128, compile=True, decode_mode="graph",
                                  _env={"XLSTM_TF32_CELL": "0"}),  # A/B: float32 cell products without TF32
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
def _measure(prefill, step_decode, lengths, new_tokens, repeats, device, vocab) -> dict:
    """prefill(ids) and step_decode(n_tokens) callables; returns tok/s figures."""
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
    t0 = time.perf_counter()
    step_decode(8)
    sync(device)
    res["warmup_decode_s"] = time.perf_counter() - t0
    times = timed(lambda: step_decode(new_tokens), device, max(1, repeats - 1))
    res["decode_tok_s"] = new_tokens / statistics.median(times)
    return res


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
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=args.device)

    def decode_only(n: int) -> None:  # time the decode steps alone: prefill of 16 tokens is untimed
        model.generate(first_tok, max_new_tokens=n, state=[tuple(t.clone() for t in b) for b in base_state])

    _, base_state = model(prompt)
    first_tok = prompt[:, -1:]
    res = _measure(lambda ids: model(ids), decode_only, args.lengths, args.new_tokens, args.repeats, args.device,
                   model.config.vocab_size)
    model.stats.reset()
    model(torch.randint(0, model.config.vocab_size, (1, args.lengths[0]), device=args.device))
    res["kernel_paths"] = dict(model.stats.kernel_paths)
    res["cell_products"] = sorted(model.stats.cell_products)
    res["decode_path"] = model.decode_path
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
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=args.device)

    @torch.no_grad()
    def prefill(ids):
        return model(ids, use_cache=True)

    @torch.no_grad()
    def decode(n: int) -> None:
        out = model(prompt, use_cache=True)
        cache, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)
        for _ in range(n):
            out = model(tok, **{_CACHE_KW: cache}, use_cache=True)
            cache, tok = _cache_of(out), out.logits[:, -1:].argmax(-1)

    res = _measure(prefill, decode, args.lengths, args.new_tokens, args.repeats, args.device, model.config.vocab_size)
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
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), device=args.device)

    @torch.no_grad()
    def prefill(ids):
        return model(ids)

    @torch.no_grad()
    def decode(n: int) -> None:
        logits, state = model(prompt)
        tok = logits[:, -1:].argmax(-1)
        for _ in range(n):
            logits, state = model(tok, state)
            tok = logits[:, -1:].argmax(-1)

    res = _measure(prefill, decode, args.lengths, args.new_tokens, args.repeats, args.device, cfg.vocab_size)
    res["path"] = "xlstm + mlstm_kernels triton_limit_chunk"
    return res


# ------------------------------------------------------------------------------------------ driver
def run_worker(target: str, model_name: str, args, env_extra: dict | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", target, "--models", model_name, "--device", args.device, "--dtype", args.dtype,
           "--lengths", ",".join(map(str, args.lengths)), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
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
    sys.path.insert(0, str(REPO))
    from xlstm_tune.model.loading import _empty_model
    from xlstm_tune.model.presets import PRESETS

    net = _empty_model(PRESETS[model_name], torch.device("meta"), torch.float32)
    return sum(p.numel() for p in net.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--models", default=None)
    ap.add_argument("--lengths", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", default=None, help="comma list of ours:<config> / ref:transformers / ref:triton")
    ap.add_argument("--worker-timeout", type=int, default=420)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.lengths = [int(x) for x in (args.lengths or ("2048,8192" if gpu else "256,1024")).split(",")]
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
    dev_name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device: {dev_name}  torch {torch.__version__}  dtype {args.dtype}  date {time.strftime('%Y-%m-%d')}", flush=True)
    roof = roofline(args.device, getattr(torch, args.dtype))
    print(f"roofline: copy {roof['copy_gb_s']:.0f} GB/s, matmul {roof['matmul_tflop_s']:.1f} TFLOP/s", flush=True)
    # The transformers reference must not see the `xlstm` package (it would switch to it).
    no_xlstm = {"PYTHONPATH": os.pathsep.join(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "xlstm_ref" not in p)}
    results: dict = {"device": dev_name, "torch": torch.__version__, "dtype": args.dtype, "roofline": roof, "rows": []}
    for model_name in models:
        n_params = weights_of(model_name)
        bytes_per = 2 if args.dtype in ("bfloat16", "float16") else 4
        limit = {"prefill": roof["matmul_tflop_s"] * 1e12 / (2 * n_params), "decode": roof["copy_gb_s"] * 1e9 / (n_params * bytes_per)}
        for target in targets:
            env = no_xlstm if target == "ref:transformers" else None
            res = run_worker(target, model_name, args, env)
            row = {"model": model_name, "target": target, **res, "limit": limit}
            results["rows"].append(row)
            brief = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items() if "tok_s" in k or k in ("error", "warmup_decode_s", "decode_path", "cell_products")}
            print(f"  {model_name:11s} {target:28s} {brief}", flush=True)
    print_table(results, args.lengths)
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
        tri_dec = f"{r['decode_tok_s'] / tri['decode_tok_s']:.2f}x" if tri.get("decode_tok_s") else "-"
        roof = f"{100 * vals[-2] / r['limit']['prefill']:.0f}%, {100 * vals[-1] / r['limit']['decode']:.0f}%"
        print(f"| {r['model']} | {r['target']} | " + " | ".join(f"{v:,.0f}" if v else "-" for v in vals) + " | "
              + " | ".join(ratios) + f" | {tri_dec} | {roof} |")


if __name__ == "__main__":
    raise SystemExit(main())
