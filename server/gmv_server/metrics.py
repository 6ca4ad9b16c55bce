"""Prometheus metrics of one server, in a registry of its own (served on --metrics-port).

mean batch size = gmv_generations_attributed_total / gmv_batch_executions_total, as Triton
reports inference count over execution count.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gmv_requests", "RPCs finished, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.generations = Counter("gmv_generations_attributed", "Generated images attributed", registry=r)
        self.batch_executions = Counter("gmv_batch_executions", "Model batches run by the dynamic batcher", registry=r)
        self.batch_size = Histogram("gmv_batch_size", "Generated images per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("gmv_queue_depth", "Requests waiting in the batcher's queue", registry=r)
        self.queue_seconds = Histogram("gmv_queue_seconds", "Time a request waited for its batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("gmv_batch_compute_seconds", "Time to run one batch through the pipeline",
                                         buckets=LATENCY_BUCKETS, registry=r)
        # One histogram per pipeline stage (label `stage`: queue, decode, embed, recall, rerank,
        # quality, credit, ledger_write), so a dashboard can show where the time goes.
        self.stage_seconds = Histogram("gmv_stage_seconds", "Seconds spent in one pipeline stage, per observation",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.ledger_writes = Counter("gmv_ledger_writes", "Ledger write attempts by outcome "
                                     "(recorded, replayed, conflict, error)", ["outcome"], registry=r)
        self.deadline_drops = Counter("gmv_deadline_dropped", "Requests dropped unrun because their deadline passed",
                                      registry=r)
