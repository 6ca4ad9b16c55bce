"""The embedded Milvus' own start-up, apart from what is served on it."""
import socket

import pytest

from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses


def leave_time_wait_on(port: int) -> None:
    """A connection to `port` closed by the listening side first, as a server closes its
    clients' connections when it stops: the port then sits in TIME_WAIT for a minute."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()
    client.recv(1)  # sees the close, so the listening side's end is the one left in TIME_WAIT
    client.close()
    listener.close()


def test_starts_on_its_port_while_the_last_servers_connections_are_in_time_wait(tmp_path):
    # A restart of Milvus on the same port always meets this. It used to move the proxy to the
    # next port, and start() then waited out its whole timeout for a server that was up elsewhere.
    port = free_port()
    leave_time_wait_on(port)
    milvus = EmbeddedMilvus(tmp_path / "milvus", port=port)
    try:
        milvus.start(attempt_timeouts_s=(60.0,))
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        milvus.stop()
