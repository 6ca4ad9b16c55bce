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


HOLDER = """
import sys, time
from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
EmbeddedMilvus(sys.argv[1], port=free_port()).start()
print("up", flush=True)
time.sleep(3600)
"""


def processes_using(data_dir) -> list[str]:
    """Command lines of the processes that name `data_dir` (its launcher and Milvus binary)."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(data_dir) in command and int(pid) != os.getpid():
            found.append(f"{pid}: {command}")
    return found


@pytest.mark.parametrize("death", ["SIGKILL", "SIGTERM then SIGKILL 1 s later"])
def test_nothing_outlives_the_gmv_process_and_the_data_dir_restarts(tmp_path, death):
    """However the process that started Milvus dies, its launcher and Milvus are gone within
    5 s (the death pipe), and the next start on that data directory needs no operator."""
    import signal
    import subprocess
    import sys
    import time

    data_dir = tmp_path / "milvus"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(data_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        assert any("milvus run standalone" in line for line in processes_using(data_dir))
        if death != "SIGKILL":
            holder.send_signal(signal.SIGTERM)
            time.sleep(1)
        holder.kill()
        holder.wait()
        deadline = time.monotonic() + 5
        while processes_using(data_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not processes_using(data_dir), processes_using(data_dir)
    finally:
        holder.kill()
    again = EmbeddedMilvus(data_dir, port=free_port())
    started = time.monotonic()
    try:
        again.start(attempt_timeouts_s=(60.0,))
        assert time.monotonic() - started < 30
    finally:
        again.stop()
    assert not processes_using(data_dir)


def test_a_lock_left_by_a_dead_gmv_process_is_taken_over(tmp_path):
    """A launcher still holding the lock of a GMV process that is gone (stuck, say) is killed,
    and the start goes on; a lock held by a live process is refused, naming it."""
    import fcntl
    import os
    import subprocess
    import sys

    from gmv_engine.errors import IndexUnavailableError

    data_dir = tmp_path / "milvus"
    data_dir.mkdir()
    # A stand-in for a stuck launcher: its own process group, holding the data dir's lock.
    stuck = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                              f"f = open({str(data_dir / 'gmv.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                              "print('locked', flush=True); time.sleep(3600)"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert stuck.stdout.readline().strip() == "locked"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = data_dir / "gmv.lock"
    lock.write_text(f"pid {os.getpid()} (embedded Milvus on port 1)\nlauncher {stuck.pid}\n")
    with pytest.raises(IndexUnavailableError, match=f"pid {os.getpid()}"):
        EmbeddedMilvus(data_dir)._acquire_lock()  # the holder is alive: refused, naming it
    assert stuck.poll() is None
    lock.write_text(f"pid {int(dead.stdout)} (embedded Milvus on port 1)\nlauncher {stuck.pid}\n")
    taker = EmbeddedMilvus(data_dir)
    taker._acquire_lock()  # the holder is gone: its stuck launcher is killed, the lock taken
    try:
        assert stuck.wait(timeout=5) == -9
        with open(lock, "a+") as probe, pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        taker._release_lock()
        stuck.kill()


def test_listens_on_loopback_only_and_a_second_data_dir_runs_beside_it(milvus, tmp_path):
    """Milvus 2.3 listens on every interface, on fixed ports: in its own network namespace
    none of that is visible; only the two bridged ports are, on 127.0.0.1. So a second data
    directory's Milvus starts beside the first with no port to collide on."""
    import os
    import urllib.request

    from gmv_engine.milvus.embedded import HEALTHZ_PORT_FILE
    from helpers import listening_sockets

    if os.environ.get("GMV_TEST_MILVUS_PORT"):
        pytest.skip("the session's Milvus was started beforehand, not by this process")
    second = EmbeddedMilvus(tmp_path / "second", port=free_port())
    try:
        second.start(attempt_timeouts_s=(90.0,))
        for server in (milvus, second):
            healthz = int((server.data_dir / HEALTHZ_PORT_FILE).read_text())
            sockets = listening_sockets(server._proc.pid)
            assert sorted((address, port) for address, port, _ in sockets) == sorted(
                [("127.0.0.1", server.port), ("127.0.0.1", healthz)])
            assert not [name for _, _, name in sockets if "milvus" in name]  # all bridged by the launcher
            with urllib.request.urlopen(f"http://127.0.0.1:{healthz}/healthz", timeout=5) as response:
                assert b"OK" in response.read()
        assert milvus.port != second.port
    finally:
        second.stop()
