"""The device layer on this machine's real hardware (CPU here; GPU-only checks skip elsewhere)."""
from __future__ import annotations

import contextlib
import importlib.util
import platform

import pytest
import torch

from xlstm_tune.errors import DeviceUnavailableError, UserError
from xlstm_tune.runtime import device as dev

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
no_mps = pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
no_gpu = pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only machine"
)


@no_gpu
def test_auto_resolves_to_cpu_without_accelerators() -> None:
    assert dev.resolve_device() == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", "cpu:0", torch.device("cpu")])
def test_cpu_spellings(name: str | torch.device) -> None:
    assert dev.resolve_device(name) == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3", torch.device("cuda")])
def test_cuda_request_without_cuda_fails_loudly(name: str | torch.device) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        dev.resolve_device(name)
    message = str(info.value)
    assert "\n" not in message
    assert "torch.cuda.is_available() is False" in message and "--device cpu" in message


@no_mps
@pytest.mark.parametrize("name", ["mps", "mps:0"])
def test_mps_request_without_mps_fails_loudly(name: str) -> None:
    with pytest.raises(DeviceUnavailableError) as info:
        dev.resolve_device(name)
    message = str(info.value)
    assert "\n" not in message
    assert "mps" in message and "--device cpu" in message


@pytest.mark.parametrize("name", ["gpu", "xpu", "cuda:x", "cuda:-1", "cpu:1", "", "mps:zero", 3])
def test_unknown_device_names_are_user_errors(name: object) -> None:
    with pytest.raises(UserError) as info:
        dev.resolve_device(name)  # type: ignore[arg-type]
    assert not isinstance(info.value, DeviceUnavailableError)
    assert "\n" not in str(info.value)


def test_memory_stats_on_cpu_are_plausible() -> None:
    stats = dev.memory_stats("cpu")
    for key in ("process_rss_mb", "system_available_mb", "system_total_mb", "watched_used_mb", "watched_total_mb"):
        assert isinstance(stats[key], float), key
    assert stats["process_rss_mb"] > 0
    assert 0 < stats["system_available_mb"] <= stats["system_total_mb"]
    # CPU watches the process against the whole machine.
    assert stats["watched_total_mb"] == stats["system_total_mb"]
    assert 0 < stats["watched_used_mb"] <= stats["system_total_mb"]
    assert not any(k.startswith(("cuda_", "mps_")) for k in stats)


def test_memory_stats_see_a_real_allocation() -> None:
    before = dev.memory_stats("cpu")["process_rss_mb"]
    blob = torch.ones(64 * 2**20 // 4)  # 64 MB, every page touched
    after = dev.memory_stats("cpu")["process_rss_mb"]
    assert after - before > 32
    del blob


def test_sync_cache_and_clock_are_noops_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert dev.synchronize(cpu) is None
    assert dev.empty_cache(cpu) is None
    assert dev.synchronize("cpu") is None
    t1 = dev.now_synced(cpu)
    t2 = dev.now_synced(cpu)
    assert t2 >= t1


def test_no_streams_or_graphs_on_cpu() -> None:
    assert dev.streams_available("cpu") is False
    with pytest.raises(DeviceUnavailableError) as info:
        dev.new_stream("cpu")
    assert "--streams 0" in str(info.value) and "\n" not in str(info.value)
    assert dev.graphs_available("cpu") is False
    with dev.stream_context(None) as ctx:  # "no stream" is a plain no-op context
        assert ctx is None
    assert isinstance(dev.stream_context(None), contextlib.nullcontext)


def test_compile_probe_is_a_bool() -> None:
    assert isinstance(dev.compile_available("cpu"), bool)


def test_device_name_and_summary() -> None:
    name = dev.device_name("cpu")
    assert isinstance(name, str) and name.strip()
    summary = dev.device_summary(torch.device("cpu"))
    assert summary["device_type"] == "cpu"
    assert summary["device_name"] == name
    assert summary["torch_version"] == torch.__version__
    assert summary["os"] == platform.platform()
    assert summary["python_version"] == platform.python_version()
    assert dev.watched_memory_label("cpu") == "process RSS"


def test_graph_capture_needs_cuda() -> None:
    with pytest.raises(DeviceUnavailableError, match="decode_mode=compiled or eager"):
        dev.capture_graph("cpu", lambda: None)


# ---- CUDA (run where a GPU is present; skipped on CPU-only machines) --------------------------------
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda_only
def test_cuda_resolves_with_index_and_reports_memory() -> None:
    cuda = dev.resolve_device("cuda")
    assert cuda.type == "cuda" and cuda.index is not None
    assert dev.resolve_device("auto") == cuda or torch.backends.mps.is_available()
    with pytest.raises(DeviceUnavailableError, match="CUDA device"):
        dev.resolve_device(f"cuda:{torch.cuda.device_count()}")
    before = dev.memory_stats(cuda)
    blob = torch.ones(64 * 2**20 // 4, device=cuda)
    after = dev.memory_stats(cuda)
    assert after["cuda_allocated_mb"] - before["cuda_allocated_mb"] >= 63
    assert after["watched_used_mb"] == after["cuda_reserved_mb"] >= after["cuda_allocated_mb"]
    assert after["watched_total_mb"] == after["device_total_mb"] > after["watched_used_mb"]
    del blob
    dev.empty_cache(cuda)
    assert dev.memory_stats(cuda)["cuda_reserved_mb"] <= after["cuda_reserved_mb"]
    assert dev.watched_memory_label(cuda) == "CUDA reserved"
    assert dev.device_name(cuda) == torch.cuda.get_device_name(cuda)
    assert dev.graphs_available(cuda) and dev.streams_available(cuda)
    assert dev.compile_available(cuda) == (importlib.util.find_spec("triton") is not None)


@cuda_only
def test_cuda_side_streams_keep_order() -> None:
    cuda = dev.resolve_device("cuda")
    streams = [dev.new_stream(cuda) for _ in range(2)]
    x = torch.arange(1 << 20, device=cuda, dtype=torch.float32)
    dev.wait_for_current(cuda, streams)
    outs = []
    for n, stream in enumerate(streams):
        with dev.stream_context(stream):
            outs.append((x * (n + 2)).sum())
    dev.join_streams(cuda, streams)
    t = dev.now_synced(cuda)
    assert t > 0
    expected = float(x.sum())
    assert [float(o) for o in outs] == pytest.approx([2 * expected, 3 * expected])


@cuda_only
def test_cuda_graph_capture_and_replay() -> None:
    cuda = dev.resolve_device("cuda")
    static_in = torch.zeros(8, device=cuda)
    counter = torch.zeros((), device=cuda)

    def step() -> torch.Tensor:
        counter.add_(1)  # in-place side effect: runs for warm-up, capture (no-op) and each replay
        return static_in * 2 + 1

    graph, out = dev.capture_graph(cuda, step, warmup=2)
    dev.synchronize(cuda)
    assert float(counter) == 2  # warm-ups ran; capture records without executing
    static_in.copy_(torch.arange(8.0, device=cuda))
    graph.replay()
    dev.synchronize(cuda)
    assert out.tolist() == [2 * i + 1 for i in range(8)]
    assert float(counter) == 3


def test_tf32_cell_products_only_for_low_precision_cuda_inputs_and_restore_the_setting() -> None:
    """TF32 is chosen for bf16/fp16 inputs on CUDA only, and the process-wide setting comes back as it was."""
    assert not dev.uses_tf32_cell_products(torch.zeros(2, dtype=torch.bfloat16))  # CPU tensors: never
    assert not dev.uses_tf32_cell_products(torch.zeros(2))
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, name)
    with dev.tf32_cell_products(True):
        assert getattr(matmul, name) in ("tf32", True)
    assert getattr(matmul, name) == before
    with pytest.raises(RuntimeError), dev.tf32_cell_products(True):
        raise RuntimeError("the setting is restored on errors too")
    assert getattr(matmul, name) == before
    with dev.tf32_cell_products(False):
        assert getattr(matmul, name) == before
