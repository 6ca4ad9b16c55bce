"""Run the gRPC server: load and warm the models, then serve until SIGTERM/SIGINT, which
drains in-flight calls (up to grace_s) before returning."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from PIL import Image

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_engine.config import PipelineSettings
from gmv_engine.index import TrainingIndex
from gmv_engine.ledger import Ledger
from gmv_engine.models import pick_device
from gmv_engine.pipeline import Attributor

from .batcher import DynamicBatcher
from .config import ServerConfig
from .metrics import ServerMetrics, package_version
from .service import AttributionService

log = logging.getLogger("gmv.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name


def build_attributor(index: TrainingIndex, config: ServerConfig) -> Attributor:
    settings = PipelineSettings(recall_k=config.recall_k, top_k=config.top_k, nprobe=config.nprobe,
                                temperature=config.temperature, reranker=config.reranker or None,
                                quality=config.quality or None, batch_size=config.max_batch_size)
    return Attributor(index, config.collection, settings, device=pick_device(config.device))


def index_info(index: TrainingIndex, attributor: Attributor, config: ServerConfig) -> pb.IndexInfo:
    info, state = attributor.info, index.index_state(config.collection)
    settings = attributor.settings
    return pb.IndexInfo(
        collection=config.collection, profile=info.profile, encoder=info.encoder, encoder_dim=info.encoder_dim,
        reranker=attributor.reranker.name, feature_dim=info.feature_dim, quality=attributor.quality.name,
        row_count=state["total_rows"], index_type=state["index_type"] or "",
        index_params={k: str(v) for k, v in state["params"].items()},
        search_params={"recall_k": str(settings.recall_k), "nprobe": str(settings.nprobe),
                       "top_k": str(settings.top_k), "temperature": str(settings.temperature)},
    )


async def serve(index: TrainingIndex, config: ServerConfig, ledger: Ledger) -> None:
    metrics = ServerMetrics(methods=[m.name for m in pb.DESCRIPTOR.services_by_name["AttributionService"].methods])
    metrics.build_info.info({"version": package_version(), "collection": config.collection})
    index.call_observer = metrics.observe_milvus_call
    metrics_server = None
    if config.metrics_port:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
        log.info("Prometheus metrics on port %d (/metrics)", config.metrics_port)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service = AttributionService(metrics, ledger, config.collection)
    pb_grpc.add_AttributionServiceServicer_to_server(service, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    log.info("listening on %s:%d (NOT_SERVING until the models are loaded and warm)", config.host, port)

    # Models load and run once before the health status turns SERVING.
    attributor = await asyncio.to_thread(build_attributor, index, config)
    await asyncio.to_thread(attributor.attribute, [Image.new("RGB", (64, 64), (127, 127, 127))])
    attributor.on_batch = metrics.observe_stages  # after the warm-up, whose times say nothing of serving
    device = pick_device(config.device)
    metrics.watch_gpu_memory(device)
    metrics.build_info.info({
        "version": package_version(), "collection": config.collection, "profile": attributor.info.profile,
        "encoder": attributor.info.encoder, "reranker": attributor.reranker.name,
        "quality": attributor.quality.name, "device": device,
    })
    batcher = DynamicBatcher(attributor.attribute, metrics, config.max_batch_size,
                             config.max_queue_delay_ms / 1000.0, config.max_queue_size)
    batcher.start()
    service.ready(attributor, batcher, index_info(index, attributor, config))
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("SERVING collection '%s' on port %d, recording to the %s ledger at %s", config.collection, port,
             ledger.backend, ledger.safe_url)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    probe = asyncio.create_task(probe_milvus(index, config)) if config.milvus_probe_s > 0 else None
    await stopping.wait()
    log.info("stopping: draining in-flight calls for up to %.0f s", config.grace_s)
    if probe is not None:
        probe.cancel()
    health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    await batcher.stop()
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")


async def probe_milvus(index: TrainingIndex, config: ServerConfig) -> None:
    """A cheap Milvus call every milvus_probe_s, so gmv_milvus_up (set by every call's
    outcome) also goes to 0 when Milvus dies while no requests arrive."""
    while True:
        await asyncio.sleep(config.milvus_probe_s)
        try:
            await asyncio.to_thread(index.exists, config.collection)
        except Exception as exc:  # noqa: BLE001 - the observer has counted it; say it once per probe
            log.warning("Milvus probe failed: %s", exc)
