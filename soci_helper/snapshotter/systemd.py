"""systemd integration of the daemon: activated sockets (LISTEN_FDS), sd_notify, and relaying an activated socket."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import selectors
import socket
import tempfile
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# sun_path holds 108 bytes including the terminating NUL.
_MAX_UNIX_PATH = 107
_CHUNK = 256 << 10


class ActivationError(Exception):
    """The service manager passed no usable listening socket."""


def listen_fds(environ: MutableMapping[str, str] | None = None, unset: bool = True) -> list[int]:
    """The file descriptors passed by socket activation, as sd_listen_fds(3) defines them.

    They are meant for this process only (LISTEN_PID), so the variables are removed and the fds made
    close-on-exec: the layer servers that the daemon spawns must neither see nor inherit them.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if unset:
        for name in _ACTIVATION_VARS:
            env.pop(name, None)
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(n, 0)))
    for fd in fds:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            return []  # the variables lie about our fds; trusting them would touch unrelated files
    return fds


def unix_listener(fds: list[int], wanted: int | None = None) -> socket.socket:
    """The first (or the `wanted`) passed fd that is a listening unix stream socket."""
    for fd in fds if wanted is None else [wanted]:
        try:
            s = socket.socket(fileno=fd)
        except OSError as exc:
            raise ActivationError(f"fd {fd} is not a socket: {exc.strerror}") from None
        if (s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            return s
        s.detach()  # not ours to close: it may be meant for something else
    if not fds:
        raise ActivationError("--address fd:// needs socket activation (LISTEN_FDS/LISTEN_PID are not set for us)")
    raise ActivationError("no listening unix stream socket among the passed file descriptors")


def socket_path(s: socket.socket) -> str:
    """What an activated socket is bound to, printable ('@name' for the abstract namespace)."""
    name = s.getsockname()
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return "@" + name[1:] if name.startswith("\0") else name


def backend_path(public: str) -> str:
    """Where the gRPC server listens behind an activated socket: next to it when the name fits, else private.

    A fixed name next to the public socket lets the server's own stale-socket and already-running checks
    work across restarts; the fallback is a fresh 0700 directory.
    """
    if public.startswith("/"):
        p = Path(public)
        candidate = str(p.with_name(f".{p.name}.grpc"))
        if len(candidate.encode()) <= _MAX_UNIX_PATH and os.access(p.parent, os.W_OK):
            return candidate
    return os.path.join(tempfile.mkdtemp(prefix="soci-snapshotter-grpc."), "grpc.sock")


class Notifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET (a path or '@abstract' name).

    The variable is taken out of the environment so that processes the daemon starts (layer servers) do
    not speak for it.
    """

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.pop("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if addr.startswith("@"):
            self.address = "\0" + addr[1:]
        elif addr.startswith("/"):
            self.address = addr
        elif addr:
            log.warning("NOTIFY_SOCKET %r is not a unix socket; not notifying the service manager", addr)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, fields: Mapping[str, str | int]) -> bool:
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(msg)
        except OSError as exc:
            # Readiness is best effort: a vanished manager must not take the snapshotter down.
            log.warning("cannot notify the service manager: %s", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify({"READY": 1, "STATUS": status, "MAINPID": os.getpid()})

    def status(self, status: str) -> bool:
        return self.notify({"STATUS": status})

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify({"STOPPING": 1, "STATUS": status})


class SocketRelay:
    """Accepts on an activated listening socket and pipes each connection to the gRPC server's own socket.

    grpcio can only bind sockets itself (its core can adopt a passed socket only when built against
    libsystemd, which the published wheels are not), so the activated socket stays with us and the server
    listens on a private one. The listening socket is never shut down or unlinked: it belongs to the service
    manager, which queues connections on it while the daemon restarts.
    """

    def __init__(self, listener: socket.socket, backend: str) -> None:
        self.listener = listener
        self.backend = backend
        self._wake_r, self._wake_w = socket.socketpair()
        self._accepting = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._pumps: list[threading.Thread] = []

    def start(self) -> None:
        # Non-blocking, so that a connection another process took between select and accept cannot block us.
        self.listener.setblocking(False)
        self._accepting.set()
        self._thread = threading.Thread(target=self._accept_loop, name="relay-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while self._accepting.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or not self._accepting.is_set():
                        return
                    try:
                        client, _ = self.listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.error("accept on the activated socket failed: %s", exc.strerror or exc)
                        continue
                    self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        client.setblocking(True)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            upstream.connect(self.backend)
        except OSError as exc:
            log.error("cannot reach the gRPC server at %s: %s", self.backend, exc.strerror or exc)
            client.close()
            upstream.close()
            return
        log.debug("relaying a connection to %s", self.backend)
        done = threading.Barrier(2, action=lambda: self._close_pair(client, upstream))
        with self._lock:
            self._conns.update((client, upstream))
            self._pumps = [t for t in self._pumps if t.is_alive()]
            for src, dst, name in ((client, upstream, "relay-in"), (upstream, client, "relay-out")):
                t = threading.Thread(target=self._pump, args=(src, dst, done), name=name, daemon=True)
                self._pumps.append(t)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        # Pass the half-close on, as a direct connection would; HTTP/2 peers rely on seeing EOF.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait()

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            self._conns.difference_update((a, b))
        a.close()
        b.close()

    def stop_accepting(self) -> None:
        """New connections wait in the listening socket's backlog (for the next daemon) from now on."""
        self._accepting.clear()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5.0)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting and end the relayed connections (after the gRPC server said goodbye on them)."""
        self.stop_accepting()
        with self._lock:
            conns, pumps = list(self._conns), list(self._pumps)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in pumps:
            t.join(timeout)
        self._wake_r.close()
        self._wake_w.close()
        # Only our descriptor: the service manager keeps its own copy of the listening socket open.
        self.listener.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns) // 2
