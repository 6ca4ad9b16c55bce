"""GPU memory metrics on a real CUDA device (skipped where there is none). Kept apart from
test_metrics.py so it runs with torch and prometheus-client alone."""
import pytest


def gpu_values(metrics) -> dict[str, float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(metrics.registry).decode()
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("gmv_gpu_") and sample.labels == {"gpu": "0"}}


def test_gpu_memory_is_exported_on_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: GPU memory metrics are exported only when serving on CUDA")
    from gmv_server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.watch_gpu_memory("cuda")
    before = gpu_values(metrics)["gmv_gpu_memory_allocated_bytes"]
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    values = gpu_values(metrics)
    assert values["gmv_gpu_memory_allocated_bytes"] >= before + block.numel()
    assert values["gmv_gpu_memory_reserved_bytes"] >= values["gmv_gpu_memory_allocated_bytes"]
    assert values["gmv_gpu_memory_total_bytes"] == torch.cuda.get_device_properties(0).total_memory
    on_cpu = ServerMetrics()
    on_cpu.watch_gpu_memory("cpu")
    assert gpu_values(on_cpu) == {}
