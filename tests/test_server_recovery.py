"""The server when Milvus goes away and comes back, and when its collection is missing.
A Milvus of its own, since this test stops it."""
import os
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from gmv_client import GMVClient
from gmv_server.healthcheck import check
from gmv_engine.datasets import read_heldout
from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
from gmv_engine.milvus.index import TrainingIndex
from gmv_engine.ingest import ingest, read_manifest

from helpers import make_info
from helpers import is_loopback, listening_sockets, metric

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses


def wait_for_metric(port: int, name: str, value: float, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while metric(port, name) != value:
        assert time.monotonic() < deadline, f"{name} is {metric(port, name)}, not {value}, after {timeout_s} s"
        time.sleep(0.5)


def test_milvus_down_gives_unavailable_and_the_server_recovers_without_restart(tmp_path, digits, offline_components):
    milvus_port, port = free_port(), free_port()
    milvus = EmbeddedMilvus(tmp_path / "milvus", port=milvus_port).start()
    server = None
    try:
        index = TrainingIndex(milvus.uri)
        encoder, reranker = offline_components
        ingest(index, "recovery", read_manifest(digits.manifest)[:200], make_info(encoder, reranker), encoder, reranker,
               progress=False)
        index.close()
        metrics_port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "gmv_server.cli", "serve", "--collection", "recovery",
                                   "--port", str(port), "--milvus-uri", milvus.uri, "--data-dir", str(tmp_path),
                                   "--metrics-port", str(metrics_port)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "GMV_MILVUS_PROBE_S": "1"})
        image = read_heldout(digits.heldout)[0][0].read_bytes()
        with GMVClient(f"127.0.0.1:{port}", timeout_s=20, retries=0) as client:
            client.wait_until_ready(timeout_s=180)
            assert len(client.attribute(image, "before").credits) == 10
            assert metric(metrics_port, "gmv_milvus_up") == 1
            milvus.stop()
            # With no request in flight, the server's probe notices (the GMVMilvusUnreachable alert),
            # and health turns NOT_SERVING.
            wait_for_metric(metrics_port, "gmv_milvus_up", 0, timeout_s=90)
            assert check(f"127.0.0.1:{port}", "", 2.0) == "NOT_SERVING"
            searches_failed = metric(metrics_port, 'gmv_milvus_errors_total{operation="search"}')
            with pytest.raises(grpc.RpcError) as caught:
                client.attribute(image, "while-down")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "Milvus" in caught.value.details()
            assert metric(metrics_port, 'gmv_milvus_errors_total{operation="search"}') == searches_failed + 1
            milvus.start()
            deadline = time.monotonic() + 120
            while True:
                try:
                    assert len(client.attribute(image, "after").credits) == 10
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() < deadline, "the server did not recover within 120 s of Milvus returning"
                    time.sleep(2)
            assert server.poll() is None  # the same server process throughout
            assert metric(metrics_port, "gmv_milvus_up") == 1
            deadline = time.monotonic() + 10
            while check(f"127.0.0.1:{port}", "", 2.0) != "SERVING":
                assert time.monotonic() < deadline, "health did not return to SERVING"
                time.sleep(0.2)
            assert metric(metrics_port, "gmv_milvus_down_seconds_total") > 0
            assert metric(metrics_port, 'gmv_milvus_restarts_total{outcome="ok"}') == 0  # not ours to restart
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
        milvus.stop()


def test_serve_refuses_a_missing_collection(milvus, tmp_path):
    result = subprocess.run([sys.executable, "-m", "gmv_server.cli", "serve", "--collection", "absent",
                             "--port", str(free_port()), "--milvus-uri", milvus.uri,
                             "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "collection 'absent' does not exist" in result.stderr


def test_serve_listens_on_loopback_beside_a_second_serve_and_sigterm_stops_it_all(tmp_path, digits, offline_components):
    import signal

    from test_cli import processes_mentioning

    data_dir = tmp_path / "served"
    milvus_port, port = free_port(), free_port()
    with EmbeddedMilvus(data_dir / "milvus", port=milvus_port) as milvus:  # build a collection to serve
        index = TrainingIndex(milvus.uri)
        encoder, reranker = offline_components
        ingest(index, "served", read_manifest(digits.manifest)[:100], make_info(encoder, reranker), encoder, reranker,
               progress=False)
        index.close()
    shutil.copytree(data_dir, other_dir := tmp_path / "other")  # a stopped Milvus' files: a second data dir

    def serve(directory, port, milvus_port):
        return subprocess.Popen([sys.executable, "-m", "gmv_server.cli", "serve", "--collection", "served",
                                 "--port", str(port), "--data-dir", str(directory), "--milvus-port", str(milvus_port),
                                 "--metrics-port", str(free_port())],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    server = serve(data_dir, port, 0)  # the default Milvus port: 19530 when free
    image = read_heldout(digits.heldout)[0][0].read_bytes()
    with GMVClient(f"127.0.0.1:{port}", timeout_s=20) as client:
        client.wait_until_ready(timeout_s=300)
        assert len(client.attribute(image, "g").credits) == 10
        # Nothing of the server, its metrics or its Milvus listens beyond loopback (defaults).
        sockets = listening_sockets(server.pid)
        assert len(sockets) >= 4 and all(is_loopback(address) for address, _, _ in sockets), sockets
        # A second server on another data dir comes up while the first runs.
        other_port = free_port()
        other = serve(other_dir, other_port, 0)  # the default too: it takes another free port
        try:
            with GMVClient(f"127.0.0.1:{other_port}", timeout_s=20) as other_client:
                other_client.wait_until_ready(timeout_s=300)
                assert len(other_client.attribute(image, "g").credits) == 10
            assert len(client.attribute(image, "g2").credits) == 10
        finally:
            other.send_signal(signal.SIGTERM)
            other.communicate(timeout=90)
    server.send_signal(signal.SIGTERM)
    output, _ = server.communicate(timeout=90)
    assert server.returncode == 0, output
    assert "draining in-flight calls" in output and "stopped" in output
    assert processes_mentioning(str(data_dir)) == [] and processes_mentioning(str(other_dir)) == []


@pytest.fixture(scope="module")
def served_data_dir(tmp_path_factory, digits, offline_components):
    """A data dir holding collection 'served' (100 digits) on a stopped embedded Milvus; tests copy it."""
    data_dir = tmp_path_factory.mktemp("served-template")
    with EmbeddedMilvus(data_dir / "milvus", port=free_port()) as milvus:
        index = TrainingIndex(milvus.uri)
        encoder, reranker = offline_components
        ingest(index, "served", read_manifest(digits.manifest)[:100], make_info(encoder, reranker), encoder, reranker,
               progress=False)
        index.close()
    return data_dir


def test_serve_restarts_its_embedded_milvus_after_kill_9_and_health_follows(served_data_dir, tmp_path, digits):
    """kill -9 of the Milvus binary while clients send: health NOT_SERVING within 10 s, SERVING
    again within 60 s with no operator, and every generation answered OK recorded exactly once."""
    import signal
    import threading

    import psutil

    from gmv_engine.ledger import open_ledger
    from gmv_server.healthcheck import check

    data_dir = tmp_path / "served"
    shutil.copytree(served_data_dir, data_dir)
    port, metrics_port = free_port(), free_port()
    images = [example[0].read_bytes() for example in read_heldout(digits.heldout)[:8]]
    answered_ok: list[str] = []
    stop_sending = threading.Event()
    senders: list[threading.Thread] = []
    server = subprocess.Popen([sys.executable, "-m", "gmv_server.cli", "serve", "--collection", "served",
                               "--port", str(port), "--data-dir", str(data_dir), "--milvus-port", str(free_port()),
                               "--metrics-port", str(metrics_port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def send(worker: int) -> None:
        with GMVClient(f"127.0.0.1:{port}", timeout_s=90) as client:  # retries UNAVAILABLE until its deadline
            for n in range(10_000):
                if stop_sending.is_set():
                    return
                generation_id = f"w{worker}-{n}"
                try:
                    client.attribute(images[n % len(images)], generation_id)
                    answered_ok.append(generation_id)
                except grpc.RpcError:
                    pass
                time.sleep(0.05)

    target = f"127.0.0.1:{port}"
    try:
        with GMVClient(target, timeout_s=20) as client:
            client.wait_until_ready(timeout_s=300)
        senders += [threading.Thread(target=send, args=(worker,)) for worker in range(2)]
        for sender in senders:
            sender.start()
        time.sleep(2)
        binary = [p for p in psutil.Process(server.pid).children(recursive=True) if p.name() == "milvus"]
        assert len(binary) == 1, binary
        binary[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while check(target, "", 1.0) == "SERVING":
            assert time.monotonic() - killed < 10, "health still SERVING 10 s after Milvus was killed"
            time.sleep(0.1)
        while check(target, "", 1.0) != "SERVING":
            assert time.monotonic() - killed < 60, "health not SERVING again 60 s after Milvus was killed"
            time.sleep(0.2)
        count_at_recovery = len(answered_ok)
        deadline = time.monotonic() + 30
        while len(answered_ok) < count_at_recovery + 4:  # answers flow again
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert metric(metrics_port, 'gmv_milvus_restarts_total{outcome="ok"}') == 1
        assert metric(metrics_port, "gmv_milvus_down_seconds_total") > 0
    finally:
        stop_sending.set()
        for sender in senders:
            sender.join(timeout=120)
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=90)
    assert "restarting the embedded Milvus" in output, output
    with open_ledger(str(data_dir / "ledger.sqlite3")) as ledger:
        assert ledger.totals()[0] == len(answered_ok) > 0
        assert all(ledger.get(generation_id) is not None for generation_id in answered_ok)
