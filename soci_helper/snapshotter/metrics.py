"""The daemon's Prometheus endpoint: its own counters plus the layer servers' state files, in upstream's names."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upstream's families (fs/metrics/common): one counter and one gauge keyed by operation_type and layer.
OPERATION_COUNT = "soci_fs_operation_count"
BYTES_SERVED = "soci_fs_bytes_served"
# Upstream's operation types where ours mean the same; the rest follow its naming style.
OP_REGISTRY_FETCH = "synchronous_read_remote_registry_fetch_count"
OP_MOUNT_FAILURE = "fuse_mount_failure_count"
OP_READ_FAILURE = "fuse_file_read_failure_count"
OP_VERIFY_FAILURE = "span_verification_failure_count"
OP_CACHE_HIT = "span_cache_hit_count"
OP_CACHE_MISS = "span_cache_miss_count"
BYTES_OP_SERVED = "synchronous_bytes_served"
BYTES_OP_FETCHED = "synchronous_bytes_fetched"

# state-file key -> operation type, per layer
_LAYER_COUNTS = {
    "spans_fetched": OP_REGISTRY_FETCH,
    "verify_failures": OP_VERIFY_FAILURE,
    "read_errors": OP_READ_FAILURE,
    "cache_hits": OP_CACHE_HIT,
    "cache_misses": OP_CACHE_MISS,
}
_LAYER_BYTES = {"bytes_served": BYTES_OP_SERVED, "bytes_fetched": BYTES_OP_FETCHED}
DECISIONS = ("remote", "local", "failed")


class DaemonCounters:
    """What the snapshotter service counts itself; thread-safe, cheap enough to call on every RPC.

    `operation("prepare")` per snapshot operation; `decision("remote" | "local" | "failed")` per layer
    the service was asked to mount lazily ("failed": the lazy mount or download failed and containerd got an error
    normally, upstream's fuse_mount_failure_count).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: Counter[str] = Counter()
        self._decisions: Counter[str] = Counter()

    def operation(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._ops[name] += n

    def decision(self, kind: str, n: int = 1) -> None:
        if kind not in DECISIONS:
            raise ValueError(f"unknown layer decision {kind!r}")
        with self._lock:
            self._decisions[kind] += n

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            return dict(self._ops), {d: self._decisions.get(d, 0) for d in DECISIONS}


# The service's default sink, so that wiring needs no constructor change.
DAEMON = DaemonCounters()


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((labels, value))

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for labels, value in sorted(self.samples, key=lambda s: sorted(s[0].items())):
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
            out.append(f"{self.name}{{{lab}}} {_number(value)}" if lab else f"{self.name} {_number(value)}")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def read_mount_states(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The layer servers' state files under ROOT/mounts, with a dead server's "alive" turned into "dead"."""
    from ..fs.server import is_server_process, mounts_dir, read_state

    out = []
    try:
        paths = sorted(mounts_dir(root).glob("*.json"))
    except OSError:
        return []
    for p in paths:
        doc = read_state(p)
        if doc is None:
            continue  # vanished or unreadable between listing and reading: the next scrape sees it again
        state = str(doc.get("state", "unknown"))
        pid = doc.get("pid")
        if state in ("starting", "alive") and isinstance(pid, int) and not is_server_process(pid, p.stem):
            doc["state"] = "dead"
        out.append(doc)
    return out


def render(mounts: Iterable[Mapping[str, Any]], counters: DaemonCounters | None = None,
           snapshots: Mapping[str, int] | None = None) -> str:
    """The exposition text for the given layer-server states, daemon counters and snapshot counts by kind."""
    ops = _Family(OPERATION_COUNT, "counter", "The count of soci snapshotter operations. Broken down by "
                  "operation type and layer sha.")
    served = _Family(BYTES_SERVED, "gauge", "The number of bytes served per soci snapshotter operations. "
                     "Broken down by operation type and layer sha.")
    mount_states = _Family("soci_fs_mounts", "gauge", "Lazy layer mounts known from their state files, by state.")
    per_layer: dict[str, Counter[str]] = defaultdict(Counter)
    by_state: Counter[str] = Counter()
    for doc in mounts:
        by_state[str(doc.get("state", "unknown"))] += 1
        layer = str(doc.get("layer_digest", ""))
        for key in (*_LAYER_COUNTS, *_LAYER_BYTES):
            v = doc.get(key, 0)
            if isinstance(v, int) and not isinstance(v, bool):
                per_layer[layer][key] += v
    for layer, sums in per_layer.items():
        for key, op in _LAYER_COUNTS.items():
            ops.add(sums[key], layer=layer, operation_type=op)
        for key, op in _LAYER_BYTES.items():
            served.add(sums[key], layer=layer, operation_type=op)
    for state, n in by_state.items():
        mount_states.add(n, state=state)

    families = [ops, served, mount_states]
    op_counts, decisions = (counters or DAEMON).snapshot()
    # Always present (upstream's tests read it with layer=""), even before the first failure.
    ops.add(decisions["failed"], layer="", operation_type=OP_MOUNT_FAILURE)
    dec = _Family("soci_snapshotter_layer_decision_count", "counter",
                  "Layers with a lazy-pull request: mounted remotely, unpacked locally, or fallen back after a "
                  "failed lazy mount.")
    for d, n in decisions.items():
        dec.add(n, decision=d)
    op = _Family("soci_snapshotter_operation_count", "counter", "Snapshot operations served, by operation.")
    for name, n in op_counts.items():
        op.add(n, operation=name)
    families += [dec, op]
    if snapshots is not None:
        snaps = _Family("soci_snapshotter_snapshots", "gauge", "Snapshots in the metadata store, by kind.")
        for kind, n in snapshots.items():
            snaps.add(n, kind=kind)
        families.append(snaps)
    out: list[str] = []
    for fam in families:
        fam.render(out)
    return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics over HTTP on "host:port" (TCP) or a unix socket path, answered by a background thread."""

    def __init__(self, address: str, root: str | os.PathLike[str], counters: DaemonCounters | None = None,
                 snapshots: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.address = address
        self.root = root
        self.counters = counters or DAEMON
        self.snapshots = snapshots
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def collect(self) -> str:
        snaps = None
        if self.snapshots is not None:
            try:
                snaps = self.snapshots()
            except Exception as exc:  # noqa: BLE001 - a failed store read must not fail the whole scrape
                log.warning("metrics: cannot count snapshots: %s", exc)
        return render(read_mount_states(self.root), self.counters, snaps)

    def start(self) -> None:
        handler = _handler(self.collect)
        if self.address.startswith("/") or self.address.startswith("unix:"):
            path = self.address.removeprefix("unix:")
            with contextlib.suppress(FileNotFoundError):
                if Path(path).is_socket():
                    os.unlink(path)  # left by an earlier daemon; the gRPC socket's liveness check guards restarts
            self._httpd = _UnixHTTPServer(path, handler)
        else:
            host, sep, port = self.address.rpartition(":")
            if not sep or not port.isdigit():
                raise ConfigError(f"metrics_address {self.address!r} is neither host:port nor a socket path")
            host = host.strip("[]")
            # Go's net.Listen semantics, as upstream: an empty host listens on every interface.
            cls = _HTTP6Server if ":" in host else ThreadingHTTPServer
            self._httpd = cls((host, int(port)), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics", daemon=True)
        self._thread.start()
        log.info("serving metrics on %s", self.url)

    @property
    def url(self) -> str:
        if self._httpd is None:
            return self.address
        if isinstance(self._httpd, _UnixHTTPServer):
            return f"unix:{self._httpd.server_address}"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if isinstance(self._httpd, _UnixHTTPServer):
            with contextlib.suppress(OSError):
                os.unlink(str(self._httpd.server_address))
        self._httpd = None


class _HTTP6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _UnixHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        # HTTPServer.server_bind wants a (host, port) pair for its name; a path has neither.
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0


def _handler(collect: Callable[[], str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
                self.send_error(404, "only /metrics is served here")
                return
            try:
                body = collect().encode()
            except Exception as exc:  # noqa: BLE001 - answer 500 rather than drop the connection
                log.exception("metrics: collecting failed")
                self.send_error(500, f"{type(exc).__name__}: {exc}")
                return
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self) -> str:
            # A unix peer has no (host, port); the default would fail formatting log lines.
            return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class's signature
            log.debug("metrics: %s %s", self.address_string(), format % args)

    return Handler
