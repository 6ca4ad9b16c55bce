"""The embedded Milvus: the real Milvus standalone server shipped by the `milvus` package.

The package's launcher starts a child `DIR/bin/milvus run standalone`; killing the launcher
alone orphans the child. So we start the launcher in its own process
group (session), and stop the whole group: SIGTERM, a bounded wait, then SIGKILL. A lock
file in the data directory stops two GMV commands from starting two servers on one
directory (which would corrupt its embedded etcd).

Nothing outlives the GMV process, however it dies (SIGKILL and the OOM killer included), as
PostgreSQL's postmaster-death pipe: the launcher's stdin is a pipe whose write end only the
GMV process holds, so the kernel closes it when GMV dies, and the launcher, reading EOF,
stops the server (SIGTERM, then SIGKILL) and exits. The server binary is the launcher's child
with a parent-death signal (SIGKILL), so it cannot outlive the launcher either. The launcher
holds the data directory's lock as well, until its server is gone.

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import IndexUnavailableError
from . import netns

if TYPE_CHECKING:
    from .index import TrainingIndex

log = logging.getLogger(__name__)

DEFAULT_PORT = 19530
ATTEMPT_TIMEOUTS_S = (90.0, 120.0)  # a healthy start takes 5-25 s here
STOP_TIMEOUT_S = 10.0  # its graceful stop can take minutes with collections loaded; GMV flushes every write first
HEALTHZ_PORT_FILE = "gmv-healthz-port"
PARENT_DEATH_GRACE_S = 2.0  # an orphaned server is stopped fast: its GMV process flushed every write
GRACEFUL_STOP_S = 8  # Milvus forces its own exit after this, within GMV's STOP_TIMEOUT_S
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

    def __init__(self, data_dir: str | Path, port: int = 0, owner: str = ""):
        self.data_dir = Path(data_dir).resolve()
        self.port = port  # 0: DEFAULT_PORT when free, else any free port (chosen at start)
        self.owner = owner or _command_name()
        self._proc: subprocess.Popen | None = None
        self._lock_file = None
        self._stopped_at: float | None = None
        self._closed = threading.Event()  # stop() was called: a restart in another thread gives up

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, attempt_timeouts_s: Sequence[float] = ATTEMPT_TIMEOUTS_S) -> "EmbeddedMilvus":
        """Start and wait until Milvus is healthy. Each attempt is bounded, and a server that
        does not come up in time is stopped and started again, so no command hangs."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # readable by its owner alone
        self._closed.clear()
        if not self.port:  # a second data dir's Milvus, say, while the first holds 19530
            self.port = DEFAULT_PORT if not _port_open(DEFAULT_PORT) else free_port()
        self._acquire_lock()
        try:
            self._start_attempts(attempt_timeouts_s)
        except BaseException:
            self.stop()
            raise
        return self

    def exited(self) -> bool:
        """The server is gone (killed, crashed): it needs a restart."""
        proc = self._proc
        return proc is None or proc.poll() is not None

    def restart(self, attempt_timeouts_s: Sequence[float] = ATTEMPT_TIMEOUTS_S) -> None:
        """Start again after the server died, keeping the data directory's lock throughout
        (gmv serve's supervisor calls this from a thread; stop() makes it give up)."""
        if self._closed.is_set():
            raise IndexUnavailableError("the embedded Milvus is stopping")
        # No wait for the dead server's etcd sessions to lapse: their leases restart with the
        # embedded etcd, so waiting here only adds to the time down (measured: 12 s more).
        self.stop_process_only()  # what is left of the group: a launcher whose server died
        self._start_attempts(attempt_timeouts_s)

    def _start_attempts(self, attempt_timeouts_s: Sequence[float]) -> None:
        if _port_open(self.port):
            raise IndexUnavailableError(
                f"port {self.port} is already in use, so the embedded Milvus cannot start there; "
                f"pass --milvus-port with a free port, or --milvus-uri http://127.0.0.1:{self.port} "
                "if a Milvus is already serving there"
            )
        # The last server's etcd sessions outlive it by their TTL; a new server that starts
        # before they lapse finds its peers' stale addresses, and hangs or panics.
        if self._stopped_at is not None:
            self._closed.wait(max(0.0, self._stopped_at + SESSION_TTL_S + 2 - time.monotonic()))
        for attempt, timeout_s in enumerate(attempt_timeouts_s, start=1):
            if self._start_once(timeout_s):
                return
            log.info("embedded Milvus did not come up within %.0f s (attempt %d of %d); restarting it once "
                     "its stale sessions have expired", timeout_s, attempt, len(attempt_timeouts_s))
            if attempt < len(attempt_timeouts_s):
                self._closed.wait(SESSION_TTL_S + 2)
        self.stop_process_only()
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
                command, stdout=launcher_log, stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,  # the death pipe: EOF when this process is gone
                pass_fds=(self._lock_file.fileno(),) if self._lock_file is not None else (),
                start_new_session=True,  # its own process group, so stop() reaches the child server too
            )
        if self._lock_file is not None:
            self._write_lock_holder(launcher_pgid=self._proc.pid)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._closed.is_set():
                raise IndexUnavailableError("the embedded Milvus was stopped while it started")
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
        """Milvus' own /healthz. (Not a pymilvus call: pymilvus pools connections per URI, and
        one made while the server is still starting keeps failing after the server is up.)"""
        return _healthz_ok(self.data_dir)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self._closed.set()
        proc, self._proc = self._proc, None  # idempotent: safe from finally blocks and signal paths
        if proc is not None:
            _stop_group(proc, timeout_s)
            self._stopped_at = time.monotonic()
        self._release_lock()

    def _acquire_lock(self) -> None:
        """Lock the data directory, as PostgreSQL checks postmaster.pid: the lock file names the
        GMV process and its launcher's process group. A lock held though that GMV process is gone
        is an earlier run's Milvus still stopping (or stuck): it is killed and the start goes on."""
        lock_path = self.data_dir / "gmv.lock"
        self._lock_file = open(lock_path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip()
            parsed = LockHolder.parse(holder)
            owner, launcher = parsed.pid, parsed.launcher
            if owner is not None and not process_alive(owner) and launcher is not None:
                log.warning("the data directory %s is held by the embedded Milvus of pid %d, which is gone; "
                            "stopping that Milvus (process group %d)", self.data_dir, owner, launcher)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(launcher, signal.SIGKILL)
                self._stopped_at = time.monotonic()  # its etcd sessions must lapse before a new start
            if not self._wait_for_lock(10.0 if owner is not None and not process_alive(owner) else 0.0):
                self._lock_file.close()
                self._lock_file = None
                raise IndexUnavailableError(
                    f"the Milvus data directory {self.data_dir} is in use by {holder or 'another process'}; "
                    "wait for it to finish, point this command at that server with --milvus-uri, or stop "
                    "that process if it is stuck"
                ) from None
        self._write_lock_holder(launcher_pgid=None)

    def _wait_for_lock(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def _write_lock_holder(self, launcher_pgid: int | None) -> None:
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"pid {os.getpid()} (embedded Milvus on port {self.port})\nport {self.port}\n"
                              f"owner {self.owner}\n")
        if launcher_pgid is not None:
            self._lock_file.write(f"launcher {launcher_pgid}\n")
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
    try:
        _signal_group_until_gone(proc, timeout_s)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the death pipe: nothing is left to read it


def _signal_group_until_gone(proc: subprocess.Popen, timeout_s: float) -> None:
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


@dataclass(frozen=True)
class LockHolder:
    """Who holds a data directory, from its lock file: the GMV process, its launcher's process
    group, the proxy's port and what the owner is (`gmv serve`, `gmv milvus run`, ...)."""

    pid: int | None = None
    launcher: int | None = None
    port: int | None = None
    owner: str = ""

    @classmethod
    def parse(cls, text: str) -> "LockHolder":
        numbers: dict[str, int] = {}
        owner = ""
        for line in text.splitlines():
            word, _, rest = line.partition(" ")
            if word == "owner":
                owner = rest.strip()
            elif (number := rest.split(" ", 1)[0]).isdigit():
                numbers[word] = int(number)
        return cls(numbers.get("pid"), numbers.get("launcher"), numbers.get("port"), owner)


def running_server(data_dir: str | Path, wait_s: float = 0.0) -> LockHolder | None:
    """The embedded Milvus another live GMV process runs on `data_dir` (`gmv milvus start`, a
    `gmv serve`), once healthy; None when nobody holds the directory. A holder still starting
    its Milvus is waited for, up to wait_s."""
    data_dir = Path(data_dir).resolve()
    lock_path = data_dir / "gmv.lock"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(lock_path) as lock_file:
                try:
                    fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return None  # nobody holds it (we only probed: the lock goes with the file)
                except BlockingIOError:
                    holder = LockHolder.parse(lock_file.read())
        except FileNotFoundError:
            return None
        if holder.pid is not None and process_alive(holder.pid) and holder.port and holder.launcher is not None:
            if _port_open(holder.port) and _healthz_ok(data_dir):
                return holder
        if time.monotonic() >= deadline or holder.pid is None or not process_alive(holder.pid):
            return None
        time.sleep(0.2)


def _healthz_ok(data_dir: Path) -> bool:
    """Every component healthy, as Milvus' own /healthz says."""
    import urllib.request

    try:
        healthz_port = int((data_dir / HEALTHZ_PORT_FILE).read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{healthz_port}/healthz", timeout=2) as response:
            return b"OK" in response.read()
    except (OSError, ValueError):
        return False


def _command_name() -> str:
    """`gmv serve`, `gmv index`, ... (or the program's name): who holds a data dir, for messages."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("gmv", "cli.py") and len(sys.argv) > 1:
        return f"gmv {sys.argv[1]}"
    return program


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@contextlib.contextmanager
def open_index(milvus_uri: str | None, data_dir: str | Path = ".gmv", port: int = 0,
               token: str = "", timeout_s: float = 30.0, feature_store: str | None = None,
               feature_cache_dir: str | None = None) -> Iterator["TrainingIndex"]:
    """A TrainingIndex on `milvus_uri`, or on an embedded Milvus started on `data_dir/milvus`
    for the duration of the block (and stopped after it, also on error or interrupt).
    feature_store: where re-rank features are kept (TrainingIndex); with the embedded Milvus,
    data_dir/features unless given."""
    from .index import TrainingIndex

    if not milvus_uri and not feature_store:
        feature_store = str(Path(data_dir).absolute() / "features")
    if milvus_uri:
        index = TrainingIndex(milvus_uri, token=token, timeout_s=timeout_s, feature_store=feature_store,
                              feature_cache_dir=feature_cache_dir)
        try:
            yield index
        finally:
            index.close()
        return
    running = running_server(Path(data_dir) / "milvus", wait_s=ATTEMPT_TIMEOUTS_S[0])
    if running is not None:  # `gmv milvus start` or a `gmv serve` runs one there: use it
        log.info("using the embedded Milvus of pid %d (%s) on port %d", running.pid, running.owner, running.port)
        with contextlib.closing(TrainingIndex(f"http://127.0.0.1:{running.port}", timeout_s=timeout_s,
                                              feature_store=feature_store)) as index:
            yield index
        return
    with EmbeddedMilvus(Path(data_dir) / "milvus", port=port) as server:
        index = TrainingIndex(server.uri, timeout_s=timeout_s, feature_store=feature_store)
        index.embedded = server
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

    from .index import MIN_INDEXED_ROWS, SEAL_PROPORTION, SEGMENT_MAX_MB

    template = Path(milvus.__file__).parent / "data" / "config.yaml.template"
    lines = []
    for line in template.read_text(encoding="utf-8").splitlines():
        # The segment sizes GMV chooses nlist for (milvus/index.py), pinned rather than assumed.
        if line.strip().startswith("maxSize: 512 # Maximum size of a segment in MB"):
            line = f"    maxSize: {SEGMENT_MAX_MB} # MB; GMV sizes nlist for a sealed segment (milvus/index.py)"
        elif line.strip().startswith("sealProportion:"):
            line = f"    sealProportion: {SEAL_PROPORTION}"
        elif line.strip().startswith("minSegmentNumRowsToEnableIndex:"):
            line = f"    minSegmentNumRowsToEnableIndex: {MIN_INDEXED_ROWS}"
        elif line.strip().startswith("ip: #"):
            line = "  ip: 127.0.0.1"
        elif line.strip().startswith("ttl: 30 # ttl value when session"):
            line = f"    ttl: {SESSION_TTL_S}"
        elif line.startswith("  endpoints: localhost:{{ etcd_port"):
            lines.append(line)
            line = f"  config:\n    path: {etcd_config}"
        elif line.strip().startswith("gracefulStopTimeout: 1800"):
            line = f"  gracefulStopTimeout: {GRACEFUL_STOP_S}"
        lines.append(line)
        if line in ("queryNode:", "indexNode:"):
            # A stopping node waits for the coordinators to move its segments elsewhere, but in a
            # standalone server they have stopped first: it waited out its 30 s timeout.
            lines.append("  gracefulStopTimeout: 1")
        if line == "queryCoord:":
            # Flushed segments join what the query node serves, and built indexes are loaded into
            # served segments, on timers of 10 s by default: until then searches ignore nprobe
            # (TrainingIndex.wait_served waits for it). Every second here: one local node.
            lines.append("  UpdateNextTargetInterval: 1 # s")
            lines.append("  checkIndexInterval: 1000 # ms")
    return "\n".join(lines)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In a child between fork and exec: SIGKILL it when its parent (the launcher) dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not Linux: the death pipe and the process group still apply
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def _stop_on_parent_death(server_proc: subprocess.Popen) -> None:
    """Read the death pipe until EOF (the GMV process that started us is gone, however it
    died), then stop the server, SIGTERM and then SIGKILL, and exit."""
    while sys.stdin.buffer.read(4096):
        pass
    server_proc.terminate()
    try:
        server_proc.wait(timeout=PARENT_DEATH_GRACE_S)
    except subprocess.TimeoutExpired:
        server_proc.kill()
        server_proc.wait()
    os._exit(0)


def _serve(data_dir: str, port: int) -> None:
    """Run the embedded Milvus in the foreground until signalled (the child of EmbeddedMilvus)."""
    import milvus
    from milvus import MilvusServer, MilvusServerConfig

    # The package starts the server with subprocess.Popen: give that child a parent-death signal.
    popen = subprocess.Popen

    def popen_dying_with_us(*args, **kwargs):
        kwargs.setdefault("preexec_fn", _die_with_parent)
        return popen(*args, **kwargs)

    milvus.subprocess = type(sys)("subprocess")  # this launcher's own view of the module, patched
    milvus.subprocess.__dict__.update(subprocess.__dict__, Popen=popen_dying_with_us)

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

    # Opened before the move into a private network: the ports GMV reaches the server through.
    proxy_listener, healthz_listener = netns.loopback_listener(port), netns.loopback_listener(0)
    why_not = netns.isolate_network()
    if why_not is None:
        inner_proxy_port = DEFAULT_PORT  # every port is free in a network of its own
    else:
        log.warning("the embedded Milvus cannot have a private network here (%s): its components listen on all "
                    "interfaces of this machine; keep its ports firewalled", why_not)
        proxy_listener.close()
        healthz_listener.close()
        inner_proxy_port = port
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
    config.update(proxy_port=inner_proxy_port, etcd_port=etcd_port)
    server = MilvusServer(config, wait_for_started=False)
    server.set_base_dir(data_dir)
    # The server shares our process group, so a group SIGTERM reaches it directly; we only wait
    # for its graceful stop, which revokes its etcd session. (The package's stop() SIGKILLs after
    # 1 s, leaving a session that makes the next start wait for its lease to expire.)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    (Path(data_dir) / HEALTHZ_PORT_FILE).unlink(missing_ok=True)
    server.start()
    import stat

    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):  # started by EmbeddedMilvus, not by hand
        threading.Thread(target=_stop_on_parent_death, args=(server.server_proc,), daemon=True).start()
    healthz_port = server.webservice_port
    if why_not is None:
        netns.bridge(proxy_listener, inner_proxy_port)
        netns.bridge(healthz_listener, healthz_port)
        healthz_port = healthz_listener.getsockname()[1]
    # The proxy answers before every component is up; /healthz on this port says when all are.
    (Path(data_dir) / HEALTHZ_PORT_FILE).write_text(str(healthz_port))
    sys.exit(server.server_proc.wait())


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
