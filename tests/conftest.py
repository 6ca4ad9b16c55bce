"""Shared fixtures: ONE real embedded Milvus per test session, and the digits data set.

Everything runs on a CPU-only machine with no internet: the `offline` profile needs no
weights, and tests of weight-needing components use stand-ins that are explicit in the test.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def milvus(tmp_path_factory):
    from gmv_engine.embedded_milvus import EmbeddedMilvus, free_port

    server = EmbeddedMilvus(tmp_path_factory.mktemp("milvus"), port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server per session (skipped, saying why, where none is installed)."""
    from gmv_engine.embedded_milvus import free_port
    from postgres_server import PostgresServer, find_bindir

    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql package)")
    server = PostgresServer(free_port()).start()
    yield server
    server.stop()


_databases = iter(range(1, 10_000))


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """A fresh, empty ledger on each backend: every ledger test runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite3")
    return request.getfixturevalue("postgres").create_database(f"gmv_ledger_{next(_databases)}")


@pytest.fixture(scope="session")
def index(milvus):
    from gmv_engine.index import TrainingIndex

    training_index = TrainingIndex(milvus.uri)
    yield training_index
    training_index.close()


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    from gmv_engine.datasets import export_digits

    return export_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def offline_components():
    from gmv_engine.encoders import create_encoder
    from gmv_engine.rerankers import create_reranker

    return create_encoder("pixels"), create_reranker("l2")


@pytest.fixture(scope="session")
def digits_collection(index, digits, offline_components):
    """The digits training split indexed with the offline profile (built once per session)."""
    from gmv_engine.index import CollectionInfo
    from gmv_engine.ingest import ingest, read_manifest

    encoder, reranker = offline_components
    info = CollectionInfo("offline", encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    report = ingest(index, "digits_offline", read_manifest(digits.manifest), info, encoder, reranker, progress=False)
    assert not report.bad, report.bad
    return "digits_offline", report


def make_info(encoder, reranker, profile: str = "offline"):
    from gmv_engine.index import CollectionInfo

    return CollectionInfo(profile, encoder.name, encoder.dim, reranker.name, reranker.feature_dim)


def png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def start_server(milvus, collection: str, log_path: Path, *extra_args: str, verbose: bool = False) -> dict:
    """`gmv serve` in a subprocess on free ports, once its health says SERVING; its data
    directory is log_path's folder. Stop it with `stop_server`. `seen` holds the health
    statuses observed while it warmed up."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gmv_engine.embedded_milvus import free_port

    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gmv_server.cli", *(["-v"] if verbose else []), "serve", "--collection", collection, "--port", str(port),
         "--metrics-port", str(metrics_port), "--milvus-uri", milvus.uri, "--data-dir", str(log_path.parent),
         *extra_args],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    seen = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service="gmv.v1.AttributionService"), timeout=2).status
            seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    else:
        process.terminate()
        pytest.fail("server never became SERVING:\n" + log_path.read_text())
    return {"target": f"127.0.0.1:{port}", "port": port, "metrics_port": metrics_port, "channel": channel,
            "seen": seen, "log": log_path, "process": process}


def stop_server(server: dict) -> None:
    server["channel"].close()
    server["process"].terminate()
    server["process"].wait(timeout=60)


def metric_samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value of each sample line of Prometheus' text format."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}
