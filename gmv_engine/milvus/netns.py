"""A private network for the embedded Milvus: loopback only, reachable through chosen ports.

Milvus 2.3 has no listen-address setting: every component (proxy, coordinators, nodes, the
metrics/healthz server) listens on all interfaces, on fixed ports. So the launcher moves
itself, before it starts the server, into a network namespace of its own where only the
loopback device exists (a user namespace too when not root, as rootless containers do).
Nothing in there is reachable from the network or collides with another server's ports.
The few ports GMV uses, the proxy's gRPC port and the healthz port, are bridged by the
launcher from listening sockets it opened on 127.0.0.1 in the host namespace before moving,
as rootlesskit's builtin port driver does.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import socket
import struct
import threading

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000  # linux/sched.h
CLONE_NEWUSER = 0x10000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # linux/sockios.h, linux/if.h
IFREQ_SIZE = 40
CHUNK = 1 << 18


def isolate_network() -> str | None:
    """Move the calling process (call it while single-threaded) into a new network namespace
    with loopback up. None on success, else why it could not (the caller then warns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    # Root without CAP_SYS_ADMIN (a container) may still create a user namespace, as others may.
    for flags in ((CLONE_NEWNET,) if os.geteuid() == 0 else ()) + (CLONE_NEWNET | CLONE_NEWUSER,):
        if libc.unshare(flags) == 0:
            break
    else:
        return f"unshare: {os.strerror(ctypes.get_errno())}"
    try:
        if flags & CLONE_NEWUSER:  # the same ids inside, so files keep their owner
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as file:
                    file.write(text)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH", b"lo", 0).ljust(IFREQ_SIZE, b"\0")
            current = struct.unpack_from("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH", b"lo", current | IFF_UP).ljust(IFREQ_SIZE, b"\0"))
    except OSError as exc:
        return f"loopback could not be brought up in the new namespace: {exc}"
    return None


def loopback_listener(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port (0: any free port) in the current namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Milvus itself binds: TIME_WAIT is no conflict
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def bridge(listener: socket.socket, target_port: int) -> None:
    """Serve `listener` (opened in the host namespace) in a daemon thread: each connection is
    joined to 127.0.0.1:target_port in this process's namespace."""
    threading.Thread(target=_accept_forever, args=(listener, target_port), daemon=True,
                     name=f"bridge-{target_port}").start()


def _accept_forever(listener: socket.socket, target_port: int) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return  # the listener was closed: the launcher is stopping
        threading.Thread(target=_join, args=(client, target_port), daemon=True).start()


def _join(client: socket.socket, target_port: int) -> None:
    try:
        upstream = socket.create_connection(("127.0.0.1", target_port), timeout=5)
    except OSError:
        client.close()  # the caller sees a closed connection, as from a server that is down
        return
    upstream.settimeout(None)
    for sock in (client, upstream):  # gRPC's small frames must not wait for Nagle's delayed ACKs
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    buffer = memoryview(bytearray(CHUNK))
    try:
        while received := source.recv_into(buffer):
            sink.sendall(buffer[:received])
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)  # pass the end of the stream on, half-close as TCP does
