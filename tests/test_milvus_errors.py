"""Milvus errors classified by the server's error code, measured on the session's real Milvus."""
import socket
import threading
import time

import numpy as np
import pytest
from pymilvus.exceptions import MilvusException

from gmv_engine.errors import CollectionNotFoundError, IndexUnavailableError
from gmv_engine.milvus.embedded import free_port
from gmv_engine.milvus.index import ERROR_CODES, TrainingIndex, milvus_error_class

MISSING = "no_such_collection_xyz"


def raw_calls(client):
    """pymilvus calls on a missing collection: what each sends the server."""
    return {
        "describe_collection": lambda: client.describe_collection(MISSING),
        "query": lambda: client.query(MISSING, filter="pk in [1]", output_fields=["pk"]),
        "search": lambda: client.search(MISSING, data=[[0.0, 1.0]], limit=3),
        "get": lambda: client.get(MISSING, ids=[1]),
        "load_collection": lambda: client.load_collection(MISSING),
        "flush": lambda: client.flush(MISSING),
        "describe_index": lambda: client.describe_index(MISSING, "embedding"),
    }


@pytest.mark.parametrize("operation", list(raw_calls(None)))
def test_missing_collection_gives_code_100(index, operation):
    # What the classifier relies on: Milvus 2.3.5 sets code 100 for every one of these calls,
    # so no call needs the message text.
    with pytest.raises(MilvusException) as caught:
        raw_calls(index.client)[operation]()
    print(operation, caught.value.code, caught.value.compatible_code, caught.value.message)
    assert caught.value.code == 100
    assert milvus_error_class(caught.value) is CollectionNotFoundError


def test_missing_collection_through_training_index(index):
    calls = {
        "fetch_features": lambda: index.fetch_features(MISSING, [1]),
        "search": lambda: index.search(MISSING, np.zeros((1, 4), np.float32), limit=3, nprobe=1),
        "existing": lambda: index.existing(MISSING, ["a"]),
        "existing_hashes": lambda: index.existing_hashes(MISSING, ["0" * 64]),
        "count": lambda: index.count(MISSING),
        "load": lambda: index.load(MISSING),
        "index_state": lambda: index.index_state(MISSING),
        "info": lambda: index.info(MISSING),
    }
    for name, call in calls.items():
        with pytest.raises(CollectionNotFoundError, match="not found|does not exist"):
            call()
        print(name, "-> CollectionNotFoundError")


def test_other_server_errors_are_unavailable(index):
    # A real non-100 code: a filter Milvus cannot parse, on a collection that exists.
    index.client.create_collection("errors_bad_filter", dimension=4)
    try:
        with pytest.raises(MilvusException) as caught:
            index.client.query("errors_bad_filter", filter="no such ((( syntax", output_fields=["id"])
        assert caught.value.code not in ERROR_CODES
        with pytest.raises(IndexUnavailableError, match="failed to"):
            index._call("query", index.client.query, "errors_bad_filter", filter="no such ((( syntax")
    finally:
        index.client.drop_collection("errors_bad_filter")


@pytest.mark.parametrize("exc, expected", [
    (MilvusException(100, "collection not found"), CollectionNotFoundError),
    (MilvusException(0, "old server", 4), CollectionNotFoundError),  # before 2.3.2: legacy error_code only
    (MilvusException(1, "collection not found, says the text", 4), IndexUnavailableError),  # code wins
    (MilvusException(65535, "can't find collection"), IndexUnavailableError),  # the message is never read
    (MilvusException(2, "Fail connecting to server"), IndexUnavailableError),
    (ConnectionError("reset"), IndexUnavailableError),
])
def test_classifier_table(exc, expected):
    assert milvus_error_class(exc) is expected


def test_grpc_status_code_in_code_is_unavailable():
    import grpc

    # pymilvus' retry wrapper raises MilvusException(grpc.StatusCode, ...) when it gives up.
    assert milvus_error_class(MilvusException(grpc.StatusCode.UNAVAILABLE, "retry timeout")) is IndexUnavailableError


def test_milvus_not_listening_is_unavailable():
    started = time.monotonic()
    with pytest.raises(IndexUnavailableError, match="cannot connect"):
        TrainingIndex(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert time.monotonic() - started < 30


class Forwarder:
    """A TCP relay to the session Milvus that can be cut, as a network outage would."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        # shutdown, not just close: a listener another thread is blocked accepting on keeps
        # listening after close() on Linux.
        for s in (self.listener, *self.sockets):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def test_milvus_gone_after_connecting_is_unavailable(milvus):
    relay = Forwarder(milvus.port)
    lost = TrainingIndex(f"http://127.0.0.1:{relay.port}", timeout_s=3)
    try:
        assert not lost.exists(MISSING)
        relay.cut()
        started = time.monotonic()
        with pytest.raises(IndexUnavailableError):
            lost.fetch_features(MISSING, [1])
        assert time.monotonic() - started < 60
    finally:
        relay.cut()
        try:
            lost.close()
        except Exception:  # noqa: BLE001 - closing a client whose server is gone may fail
            pass
