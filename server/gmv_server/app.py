"""Run the gRPC server: load and warm every served collection's models, then serve until
SIGTERM/SIGINT, which drains in-flight calls (up to grace_s) before returning."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gmv.v1 import attribution_pb2 as pb
from gmv_engine.errors import GMVError
from gmv_engine.ledger import Ledger
from gmv_engine.milvus.index import TrainingIndex
from gmv_engine.models import pick_device
from gmv_engine.settings import Settings

from . import housekeeping
from .auth import AuthInterceptor, Authenticator, KeyCache
from .attribution_service import AttributionService
from .grpc_service import GrpcAttributionService, add_to_server
from .metrics import ServerMetrics, package_version
from .supervision import MilvusSupervisor

log = logging.getLogger("gmv.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AttributionService"].full_name
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["AttributionService"].methods]


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS from the settings' PEM files; mutual TLS when tls_client_ca is set. A file that is
    missing or not PEM is a clear error naming its setting (`gmv serve` checks before Milvus starts)."""
    def read(setting: str) -> bytes:
        path = getattr(settings, setting)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise GMVError(f"{setting} {path}: {exc.strerror}") from None
        if b"-----BEGIN " not in data:
            raise GMVError(f"{setting} {path} is not a PEM file")
        return data

    client_ca = read("tls_client_ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(read("tls_key"), read("tls_cert"))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def build_info(service: AttributionService, device: str) -> dict[str, str]:
    """gmv_build_info's labels: each one lists the served collections' values in order."""
    descriptions = service.list_collections()

    def joined(attribute: str) -> str:
        return ",".join(getattr(d, attribute) for d in descriptions)

    return {"version": package_version(), "collection": joined("collection"), "profile": joined("profile"),
            "encoder": joined("encoder"), "reranker": joined("reranker"), "quality": joined("quality"),
            "device": device}


async def serve(index: TrainingIndex, settings: Settings, ledger: Ledger) -> None:
    collections = list(settings.collections)
    metrics = ServerMetrics(methods=METHODS)
    metrics.build_info.info({"version": package_version(), "collection": ",".join(collections)})
    metrics.export_collections(collections)
    index.call_observer = metrics.observe_milvus_call
    metrics_server = None
    if settings.metrics_port:
        from prometheus_client import start_http_server

        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host, registry=metrics.registry)
        log.info("Prometheus metrics on %s:%d (/metrics)", settings.metrics_host, settings.metrics_port)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    service = AttributionService(settings, ledger, metrics)
    servicer = GrpcAttributionService(service)
    authenticator = Authenticator(KeyCache(ledger), client_certificates=bool(settings.tls_client_ca))
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", settings.max_message_mb * 1024 * 1024)],
                             interceptors=[AuthInterceptor(authenticator, servicer.refuse)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_to_server(servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, server_credentials(settings)) if settings.tls_cert else \
            server.add_insecure_port(address)
    except RuntimeError as exc:  # gRPC's only word for a certificate and key that do not go together
        raise GMVError(f"cannot listen on {address}{' with TLS (is tls_key the key of tls_cert?)' if settings.tls_cert else ''}: "
                       f"{exc}") from None
    health_server = None
    if settings.health_port:  # health only, so no data and no credential ever crosses it in the clear
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        await health_server.start()
        log.info("health service alone, in plaintext, on %s:%d", settings.host, settings.health_port)
    await server.start()
    log.info("listening on %s:%d%s (NOT_SERVING until the models are loaded and warm)", settings.host, port,
             " with TLS" + (" and client certificates" if settings.tls_client_ca else "") if settings.tls_cert else "")
    if not await authenticator.enabled():
        log.warning("no API key exists, so every caller is trusted and names its own tenant; create one with "
                    "`gmv keys create --tenant T --role attribute` to require keys (docs/SECURITY.md)")

    # Models load (each once, shared by the collections that use it) and run once before the
    # health status turns SERVING; stage metrics start after the warm-up.
    device = pick_device(settings.device)
    housekeeping.bound_native_memory()
    await service.start(index, collections, device)
    housekeeping.freeze_startup_objects()
    metrics.watch_gpu_memory(device)
    metrics.build_info.info(build_info(service, device))
    def set_serving(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, status)

    set_serving(True)
    log.info("SERVING collection%s '%s' on port %d (%d models loaded), recording to the %s ledger at %s",
             "s" if len(collections) > 1 else "", "', '".join(collections), port, len(service.models),
             ledger.backend, ledger.safe_url)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    supervisor = MilvusSupervisor(index, collections[0], metrics, set_serving, probe_s=settings.milvus_probe_s,
                                  watch=service.refresh_removals)
    probe = asyncio.create_task(supervisor.run()) if settings.milvus_probe_s > 0 else None
    tidying = asyncio.create_task(housekeeping.run())  # memory back after a burst of requests
    await stopping.wait()
    log.info("stopping: draining in-flight calls for up to %.0f s", settings.grace_s)
    if probe is not None:
        probe.cancel()
    tidying.cancel()
    health_servicer.enter_graceful_shutdown()
    await server.stop(settings.grace_s)
    if health_server is not None:
        await health_server.stop(0)
    await service.stop()
    if metrics_server is not None:
        metrics_server.shutdown()
    log.info("stopped")

