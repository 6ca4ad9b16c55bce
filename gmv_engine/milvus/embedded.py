"""The embedded Milvus: the real Milvus standalone server shipped by the `milvus` package.

The package's launcher starts a child `DIR/bin/milvus run standalone`; killing the launcher
alone orphans the child. So we start the launcher in its own process
group (session), and stop the whole group: SIGTERM, a bounded wait, then SIGKILL. A lock
file in the data directory stops two GMV commands from starting two servers on one
directory (which would corrupt its embedded etcd).

We launch through `python -m gmv_engine.milvus.embedded DIR PORT` rather than the package's
`milvus-server`, to pin every Milvus component to 127.0.0.1: left empty, each advertises the
machine's first non-loopback address, and on machines where that address is firewalled or
slow the components' dials to each other fail and start-up hangs.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import IndexUnavailableError

if TYPE_CHECKING:
    from .index import TrainingIndex

log = logging.getLogger(__name__)

DEFAULT_PORT = 19530
ATTEMPT_TIMEOUTS_S = (90.0, 120.0)  # a healthy start takes 5-25 s here
STOP_TIMEOUT_S = 10.0  # its graceful stop can take minutes with collections loaded; GMV flushes every write first
HEALTHZ_PORT_FILE = "gmv-healthz-port"
SESSION_TTL_S = 10  # etcd lease of each Milvus component's session (Milvus' default: 30 s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedMilvus:
    """Start/stop the embedded Milvus on `data_dir`. Use as a context manager."""

    def __init__(self, data_dir: str | Path, port: int = DEFAULT_PORT):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self._proc: subprocess.Popen | None = None
        self._lock_file = None
        self._stopped_at: float | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, attempt_timeouts_s: Sequence[float] = ATTEMPT_TIMEOUTS_S) -> "EmbeddedMilvus":
        """Start and wait until Milvus is healthy. Each attempt is bounded, and a server that
        does not come up in time is stopped and started again, so no command hangs."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        try:
            if _port_open(self.port):
                raise IndexUnavailableError(
                    f"port {self.port} is already in use, so the embedded Milvus cannot start there; "
                    f"pass --milvus-port with a free port, or --milvus-uri http://127.0.0.1:{self.port} "
                    "if a Milvus is already serving there"
                )
            # The last server's etcd sessions outlive it by their TTL; a new server that starts
            # before they lapse finds its peers' stale addresses, and hangs or panics.
            if self._stopped_at is not None:
                time.sleep(max(0.0, self._stopped_at + SESSION_TTL_S + 2 - time.monotonic()))
            for attempt, timeout_s in enumerate(attempt_timeouts_s, start=1):
                if self._start_once(timeout_s):
                    return self
                log.info("embedded Milvus did not come up within %.0f s (attempt %d of %d); restarting it once "
                         "its stale sessions have expired", timeout_s, attempt, len(attempt_timeouts_s))
                if attempt < len(attempt_timeouts_s):
                    time.sleep(SESSION_TTL_S + 2)
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise IndexUnavailableError(
            f"the embedded Milvus did not start in {len(attempt_timeouts_s)} attempts; see {self.data_dir / 'gmv-launcher.log'} "
            f"and {self.data_dir / 'logs'}"
        )

    def _start_once(self, timeout_s: float) -> bool:
        command = [sys.executable, "-m", "gmv_engine.milvus.embedded", str(self.data_dir), str(self.port)]
        log_path = self.data_dir / "gmv-launcher.log"
        log.info("starting embedded Milvus on port %d with data in %s", self.port, self.data_dir)
        with open(log_path, "ab") as launcher_log:
            self._proc = subprocess.Popen(
                command, stdout=launcher_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() reaches the child server too
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:  # e.g. a panic on a previous server's stale session
                log.info("embedded Milvus exited during start-up (code %d); see %s", self._proc.returncode, log_path)
                self.stop_process_only()
                return False
            if _port_open(self.port) and self._healthy():
                log.info("embedded Milvus is up at %s", self.uri)
                return True
            time.sleep(0.5)
        self.stop_process_only()
        return False

    def stop_process_only(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _stop_group(proc, STOP_TIMEOUT_S)

    def _healthy(self) -> bool:
        """Every component healthy, as Milvus' own /healthz says. (Not a pymilvus call: pymilvus
        pools connections per URI, and one made while the server is still starting keeps
        failing after the server is up.)"""
        import urllib.request

        try:
            healthz_port = int((self.data_dir / HEALTHZ_PORT_FILE).read_text())
            with urllib.request.urlopen(f"http://127.0.0.1:{healthz_port}/healthz", timeout=2) as response:
                return b"OK" in response.read()
        except (OSError, ValueError):
            return False

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        proc, self._proc = self._proc, None  # idempotent: safe from finally blocks and signal paths
        if proc is not None:
            _stop_group(proc, timeout_s)
            self._stopped_at = time.monotonic()
        self._release_lock()

    def _acquire_lock(self) -> None:
        lock_path = self.data_dir / "gmv.lock"
        self._lock_file = open(lock_path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "another process"
            self._lock_file.close()
            self._lock_file = None
            raise IndexUnavailableError(
                f"the Milvus data directory {self.data_dir} is in use by {holder}; "
                "wait for it to finish, or point this command at that server with --milvus-uri"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()} (embedded Milvus on port {self.port})\n")
        self._lock_file.flush()

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "EmbeddedMilvus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM the whole process group, wait, then SIGKILL: bounded, and nothing orphaned."""
    pgid = proc.pid  # start_new_session made the launcher its group's leader
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(pgid):
                proc.wait(timeout=1)
                return
            time.sleep(0.2)
        log.info("embedded Milvus (group %d) still running %.0f s after %s; killing it (all writes were flushed)",
                 pgid, wait_s, sig.name)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextlib.contextmanager
def open_index(milvus_uri: str | None, data_dir: str | Path = ".gmv", port: int = DEFAULT_PORT,
               token: str = "", timeout_s: float = 30.0) -> Iterator["TrainingIndex"]:
    """A TrainingIndex on `milvus_uri`, or on an embedded Milvus started on `data_dir/milvus`
    for the duration of the block (and stopped after it, also on error or interrupt)."""
    from .index import TrainingIndex

    if milvus_uri:
        index = TrainingIndex(milvus_uri, token=token, timeout_s=timeout_s)
        try:
            yield index
        finally:
            index.close()
        return
    with EmbeddedMilvus(Path(data_dir) / "milvus", port=port) as server:
        index = TrainingIndex(server.uri, timeout_s=timeout_s)
        try:
            yield index
        finally:
            index.close()


def _loopback_template(etcd_config: Path) -> str:
    """The `milvus` package's config template, changed so that servers on one machine neither
    collide nor hang: every component's `ip:` set to loopback; the embedded etcd given a
    config file (its peer port is otherwise fixed at 2380, so a second server fails to
    start); and a shorter etcd session TTL (after a restart the new components wait until
    the previous run's sessions expire: about 20 s with Milvus' default of 30 s)."""
    import milvus

    template = Path(milvus.__file__).parent / "data" / "config.yaml.template"
    lines = []
    for line in template.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("ip: #"):
            line = "  ip: 127.0.0.1"
        elif line.strip().startswith("ttl: 30 # ttl value when session"):
            line = f"    ttl: {SESSION_TTL_S}"
        elif line.startswith("  endpoints: localhost:{{ etcd_port"):
            lines.append(line)
            line = f"  config:\n    path: {etcd_config}"
        lines.append(line)
    return "\n".join(lines)


def _serve(data_dir: str, port: int) -> None:
    """Run the embedded Milvus in the foreground until signalled (the child of EmbeddedMilvus)."""
    import milvus
    from milvus import MilvusServer, MilvusServerConfig

    class PortCheckingConfig(MilvusServerConfig):
        """The package checks each port by binding it without SO_REUSEADDR, which fails for a
        minute after a restart while the last server's connections sit in TIME_WAIT, though
        Milvus itself (Go sets SO_REUSEADDR) can listen there. Check the way Milvus binds:
        a port still fails while anything listens on it."""

        def try_bind_port(self, port: int):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return sock
            except OSError:
                sock.close()
                return None

    etcd_port, etcd_peer_port = free_port(), free_port()
    etcd_config = Path(data_dir) / "gmv-etcd.yaml"
    etcd_config.write_text(
        "name: gmv-embedded\n"
        f"listen-client-urls: http://127.0.0.1:{etcd_port}\n"
        f"advertise-client-urls: http://127.0.0.1:{etcd_port}\n"
        f"listen-peer-urls: http://127.0.0.1:{etcd_peer_port}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer_port}\n"
        f"initial-cluster: gmv-embedded=http://127.0.0.1:{etcd_peer_port}\n",
        encoding="utf-8",
    )
    template = Path(data_dir) / "gmv-milvus.yaml.template"
    template.write_text(_loopback_template(etcd_config), encoding="utf-8")
    config = PortCheckingConfig(template=str(template))
    config.glog_conf_file = str(Path(milvus.__file__).parent / "data" / "glog.conf")  # set only for its own template
    # Passed as required ports, not defaults: for a default the package scans on to the next free
    # port when a bind fails, and a proxy that moved off `port` looks to us like one that never starts.
    config.update(proxy_port=port, etcd_port=etcd_port)
    server = MilvusServer(config, wait_for_started=False)
    server.set_base_dir(data_dir)
    # The server shares our process group, so a group SIGTERM reaches it directly; we only wait
    # for its graceful stop, which revokes its etcd session. (The package's stop() SIGKILLs after
    # 1 s, leaving a session that makes the next start wait for its lease to expire.)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    (Path(data_dir) / HEALTHZ_PORT_FILE).unlink(missing_ok=True)
    server.start()
    # The proxy answers before every component is up; /healthz on this port says when all are.
    (Path(data_dir) / HEALTHZ_PORT_FILE).write_text(str(server.webservice_port))
    sys.exit(server.server_proc.wait())


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
