"""Helpers every test module shares (test modules never import each other): free ports,
starting and stopping `gmv serve`, image bytes, CSVs and Prometheus samples."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import struct
import subprocess
import tempfile
import urllib.request
import zlib

import sys
from pathlib import Path

import pytest

from gmv_engine.milvus.embedded import free_port  # noqa: F401 - re-exported for the tests

GMV = [sys.executable, "-m", "gmv_server.cli"]


def make_info(encoder, reranker, profile: str = "offline"):
    from gmv_engine.milvus.index import CollectionInfo

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


def start_server(milvus, collection: str, log_path: Path, *extra_args: str, verbose: bool = False,
                 port: int | None = None, health_tls_ca: Path | None = None, health_port_flag: bool = False) -> dict:
    """`gmv serve` in a subprocess on free ports (the gRPC one `port` when given, e.g. to
    restart a server where it was), once its health says SERVING; its data directory is
    log_path's folder. Stop it with `stop_server`. `seen` holds the health statuses observed
    while it warmed up."""
    import subprocess
    import sys
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from gmv_engine.milvus.embedded import free_port

    port, metrics_port = port or free_port(), free_port()
    health_port = free_port() if health_port_flag else None  # health over plaintext (e.g. under mutual TLS)
    if health_port:
        extra_args = (*extra_args, "--health-port", str(health_port))
    process = subprocess.Popen(
        [sys.executable, "-m", "gmv_server.cli", *(["-v"] if verbose else []), "serve", "--collection", collection, "--port", str(port),
         "--metrics-port", str(metrics_port), "--milvus-uri", milvus.uri, "--data-dir", str(log_path.parent),
         *extra_args],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(health_tls_ca.read_bytes())) \
        if health_tls_ca else grpc.insecure_channel(f"127.0.0.1:{health_port or port}")
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


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def metric(port: int, name: str) -> float:
    """A metric's value from /metrics, summed over its label sets (e.g. every collection's)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    if not values:
        raise KeyError(name)
    return sum(values)


# -- a real PostgreSQL server for the ledger tests: Debian's package, started on loopback in a
# temporary directory. PostgreSQL refuses to run as root, so as root it runs as `postgres`.
def find_bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresServer:
    def __init__(self, port: int):
        self.port = port
        self.bindir = find_bindir()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL's initdb was not found; `make test` installs Debian's postgresql")
        self.root = Path(tempfile.mkdtemp(prefix="gmv-postgres-"))
        self.data = self.root / "data"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, user="postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as_user, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> "PostgresServer":
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        self.resume()
        return self

    def resume(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start")

    def pause(self) -> None:
        """Stop the server but keep its data, as an outage would."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self.pause()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def listening_sockets(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket, in this machine's network
    namespace, of `root_pid` and all its descendants."""
    import psutil

    root = psutil.Process(root_pid)
    processes = {root.pid: root.name()}
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            processes[child.pid] = child.name()
    return [(conn.laddr.ip, conn.laddr.port, processes[conn.pid]) for conn in psutil.net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN and conn.pid in processes]


def is_loopback(address: str) -> bool:
    """127.0.0.0/8 or ::1, also as gRPC binds 127.0.0.1: an IPv4-mapped IPv6 socket (::ffff:127.0.0.1)."""
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)
