"""Prometheus metrics of one server, in a registry of its own (served on --metrics-port).
docs/METRICS.md says what each one measures.

mean batch size = gmv_generations_attributed_total / gmv_batch_executions_total, as Triton
reports inference count over execution count.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily

from gmv_engine.errors import IndexUnavailableError

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# q in [0, 1]: 0 on its own (flat images, or a metric that scores a domain 0), then tenths.
QUALITY_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# queue and decode are per request; embed..credit per batch (pipeline.STAGES); ledger_write per transaction.
STAGES = ("queue", "decode", "embed", "recall", "rerank", "quality", "credit", "ledger_write")
LEDGER_OUTCOMES = ("recorded", "replayed", "conflict", "error")


def package_version() -> str:
    """The installed distribution's version (pyproject), or the source tree's when not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gmv")
    except PackageNotFoundError:
        from gmv_engine import __version__

        return __version__


class ServerMetrics:
    def __init__(self, methods: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.methods = tuple(methods)
        # Request-level metrics carry `collection`: the served collection a request named ("" when
        # it named none or an unknown one, so callers cannot mint series).
        self.requests = Counter("gmv_requests", "RPCs finished, by method, gRPC status code and collection",
                                ["method", "code", "collection"], registry=r)
        self.stream_item_errors = Counter("gmv_stream_item_errors", "Generations of an AttributeStream that "
                                          "failed and came back as a result with `error` set (the stream went "
                                          "on), by status code and collection", ["code", "collection"], registry=r)
        self.generation_seconds = Histogram(
            "gmv_generation_duration_seconds",
            "Server-side end-to-end seconds of one generation attributed: from its request's arrival "
            "to its result being ready to send (decode, queue, batch, ledger write)",
            ["collection"], buckets=LATENCY_BUCKETS, registry=r)
        self.generations = Counter("gmv_generations_attributed", "Generated images attributed (computed, not "
                                   "replayed), by collection", ["collection"], registry=r)
        self.quality = Histogram("gmv_generation_quality", "q of each generation attributed (after min_quality): "
                                 "the share of the credit pool it passes on, by collection", ["collection"],
                                 buckets=QUALITY_BUCKETS, registry=r)
        self.batch_executions = Counter("gmv_batch_executions", "Model batches run by the dynamic batcher", registry=r)
        self.batch_size = Histogram("gmv_batch_size", "Generated images per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("gmv_queue_depth", "Requests waiting in the batcher's queue", registry=r)
        self.queue_capacity = Gauge("gmv_queue_capacity", "max_queue_size: the queue depth past which "
                                    "requests are refused with RESOURCE_EXHAUSTED", registry=r)
        self.queue_rejections = Counter("gmv_queue_rejected", "Unary requests refused with RESOURCE_EXHAUSTED, by "
                                        "reason: queue (max_queue_size), tenant (its max_tenant_line_mb), rate "
                                        "(tenant_rate_limit) or in_flight (tenant_max_in_flight)",
                                        ["reason"], registry=r)
        for reason in ("queue", "tenant", "rate", "in_flight"):
            self.queue_rejections.labels(reason=reason)
        self.compute_seconds = Histogram("gmv_batch_compute_seconds", "Time to run one batch through the pipeline",
                                         buckets=LATENCY_BUCKETS, registry=r)
        # One histogram per pipeline stage (label `stage`), so a dashboard can show where the time goes.
        self.stage_seconds = Histogram("gmv_stage_seconds", "Seconds spent in one pipeline stage, per observation "
                                       "(queue, decode: per generation; ledger_write: per ledger transaction; the others: per batch)",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        self.queue_seconds = self.stage_seconds.labels(stage="queue")
        self.ledger_writes = Counter("gmv_ledger_writes", "Ledger write attempts by outcome "
                                     "(recorded, replayed, conflict, error) and collection",
                                     ["outcome", "collection"], registry=r)
        self.deadline_drops = Counter("gmv_deadline_dropped", "Requests dropped unrun because their deadline passed",
                                      registry=r)
        self.cancelled_drops = Counter("gmv_cancelled_dropped", "Requests dropped unrun because their call was "
                                       "cancelled or their stream ended before their batch ran", registry=r)
        self.milvus_seconds = Histogram("gmv_milvus_request_duration_seconds",
                                        "Seconds per Milvus call, by pymilvus operation, failed calls included",
                                        ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.milvus_errors = Counter("gmv_milvus_errors", "Milvus calls that failed, by pymilvus operation",
                                     ["operation"], registry=r)
        for operation in ("search", "query"):  # the attribution path's calls
            self.milvus_seconds.labels(operation=operation)
            self.milvus_errors.labels(operation=operation)
        self.milvus_up = Gauge("gmv_milvus_up", "1 when the last Milvus call or probe succeeded, "
                               "0 when Milvus could not be reached", registry=r)
        self.milvus_down_seconds = Counter("gmv_milvus_down_seconds", "Seconds Milvus could not be reached "
                                           "(health NOT_SERVING meanwhile), as the supervisor's probes saw it",
                                           registry=r)
        self.milvus_restarts = Counter("gmv_milvus_restarts", "Restarts of the embedded Milvus after it died, "
                                       "by outcome (ok, failed)", ["outcome"], registry=r)
        for outcome in ("ok", "failed"):
            self.milvus_restarts.labels(outcome=outcome)
        self.build_info = Info("gmv_build", "The running server: version, collections, profiles, encoders, "
                               "re-rankers, quality metrics (comma-separated, in the order served) and torch device",
                               registry=r)

    def export_collections(self, collections: Iterable[str]) -> None:
        """Series at 0 from the start for every served collection, so rate() has one to work on."""
        for collection in collections:
            for method in self.methods:
                self.requests.labels(method, "OK", collection)
            self.generations.labels(collection=collection)
            self.quality.labels(collection=collection)
            self.generation_seconds.labels(collection=collection)
            for outcome in LEDGER_OUTCOMES:
                self.ledger_writes.labels(outcome=outcome, collection=collection)

    def observe_stages(self, seconds: Mapping[str, float]) -> None:
        """The Attributor's per-batch observer: one observation per stage it ran."""
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage=stage).observe(value)

    def observe_milvus_call(self, operation: str, seconds: float, error: BaseException | None) -> None:
        """TrainingIndex's per-call observer."""
        self.milvus_seconds.labels(operation=operation).observe(seconds)
        if error is None:
            self.milvus_up.set(1)
            return
        self.milvus_errors.labels(operation=operation).inc()
        # Only "cannot reach / Milvus failed" means down; a missing collection is an answer.
        if isinstance(error, IndexUnavailableError):
            self.milvus_up.set(0)

    def watch_gpu_memory(self, device: str) -> None:
        """Export torch's CUDA memory counters, read at each scrape (only when serving on CUDA)."""
        if device.startswith("cuda"):
            self.registry.register(_GpuMemoryCollector(device))


class _GpuMemoryCollector:
    def __init__(self, device: str):
        self.device = device

    def collect(self):
        import torch

        index = torch.device(self.device).index
        index = torch.cuda.current_device() if index is None else index
        label = [str(index)]
        for name, value, help_text in (
            ("gmv_gpu_memory_allocated_bytes", torch.cuda.memory_allocated(index),
             "Bytes of GPU memory held by tensors (torch.cuda.memory_allocated)"),
            ("gmv_gpu_memory_reserved_bytes", torch.cuda.memory_reserved(index),
             "Bytes of GPU memory reserved by torch's caching allocator (torch.cuda.memory_reserved)"),
            ("gmv_gpu_memory_total_bytes", torch.cuda.get_device_properties(index).total_memory,
             "Total memory of the GPU"),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["gpu"])
            family.add_metric(label, float(value))
            yield family
