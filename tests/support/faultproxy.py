"""A loopback HTTP proxy in front of a registry that injects faults into chosen requests.

Usage::

    with FaultProxy(reg.host) as px:                 # clients talk to px.host instead
        px.add("status", status=503, path="/blobs/", nth=1)
        px.add("truncate", path="/blobs/", after_bytes=1000)
        px.add("reset", method="GET", times=2)
        px.add("status", status=429, retry_after=1)
        px.add("stall", seconds=5)                    # before the answer (or mid-body with after_bytes)
        px.add("corrupt", path="/blobs/", after_bytes=10)
        ...
        px.seen                                       # [(method, path, range header), ...]

A rule matches requests by method and path substring; it fires on the `nth`
matching request (1-based; every match when None) for `times` times in all.
The Host header is forwarded unchanged, so the registry's Location URLs point
back at the proxy.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_BLOCK = 1 << 20


@dataclass
class Fault:
    action: str  # reset | status | truncate | stall | corrupt
    method: str | None = None
    path: str | None = None
    nth: int | None = None
    times: int = 1
    status: int = 500
    retry_after: int | None = None
    after_bytes: int = 0
    seconds: float = 0.0
    matched: int = 0
    fired: int = 0

    def fires(self, method: str, path: str) -> bool:
        if self.method and self.method != method:
            return False
        if self.path and self.path not in path:
            return False
        self.matched += 1
        if self.fired >= self.times:
            return False
        if self.nth is not None and self.matched < self.nth:
            return False
        self.fired += 1
        return True


class FaultProxy:
    """Threaded loopback proxy to `upstream` (`host:port`, plain HTTP) with injectable faults."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: list[Fault] = []
        self.seen: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.server_address[1]}"

    def add(self, action: str, **kw: Any) -> Fault:
        f = Fault(action, **kw)
        with self._lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.seen.clear()

    def _pick(self, method: str, path: str, rng: str | None) -> Fault | None:
        with self._lock:
            self.seen.append((method, path, rng))
            chosen = None
            for f in self.faults:
                # Every rule counts the request, the first that fires wins.
                if f.fires(method, path) and chosen is None:
                    chosen = f
            return chosen

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream_conn: http.client.HTTPConnection | None = None

            def log_message(self, *a: Any) -> None:
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                fault = proxy._pick(self.command, self.path, self.headers.get("Range"))
                if fault is not None and fault.action == "reset":
                    self._reset()
                    return
                if fault is not None and fault.action == "status":
                    self._status(fault)
                    return
                if fault is not None and fault.action == "stall" and not fault.after_bytes:
                    time.sleep(fault.seconds)
                resp = self._forward(body)
                if resp is None:
                    return
                self._relay(resp, fault)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def _reset(self) -> None:
                # SO_LINGER 0 turns close() into a TCP RST: what a crashing peer looks like.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _status(self, fault: Fault) -> None:
                data = b'{"errors":[{"code":"UNAVAILABLE","message":"injected fault"}]}'
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if fault.retry_after is not None:
                    self.send_header("Retry-After", str(fault.retry_after))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forward(self, body: bytes | None) -> http.client.HTTPResponse | None:
                # A fresh upstream connection per request: a reused one that turns out
                # stale would force a resend, and resending a PATCH corrupts an upload.
                self._drop_upstream()
                h, p = proxy.upstream.rsplit(":", 1)
                c = self.upstream_conn = http.client.HTTPConnection(h, int(p), timeout=60)
                try:
                    c.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            c.putheader(k, v)
                    if body is not None or self.command in ("POST", "PUT", "PATCH"):
                        c.putheader("Content-Length", str(len(body or b"")))
                    c.endheaders(body)
                    return c.getresponse()
                except (OSError, http.client.HTTPException):
                    self._drop_upstream()
                    self.send_error(502)
                    return None

            def _relay(self, resp: http.client.HTTPResponse, fault: Fault | None) -> None:
                has_body = self.command != "HEAD" and resp.status not in (204, 304)
                data = b""
                length = resp.getheader("Content-Length")
                if has_body and length is None:
                    data = resp.read()  # chunked or close-delimited upstream: buffer it
                self.send_response_only(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() not in ("content-length", "date", "server"):
                        self.send_header(k, v)
                total = int(length) if length is not None else len(data)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                if not has_body:
                    self._drop_upstream()
                    return
                sent = 0
                while sent < total:
                    block = data[sent:sent + _BLOCK] if length is None else resp.read(min(_BLOCK, total - sent))
                    if not block:
                        break
                    if fault is not None and sent <= fault.after_bytes < sent + len(block):
                        cut = fault.after_bytes - sent
                        if fault.action == "truncate":
                            self.wfile.write(block[:cut])
                            self.wfile.flush()
                            self._drop_upstream()
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if fault.action == "corrupt":
                            b = bytearray(block)
                            b[cut] ^= 0xFF
                            block = bytes(b)
                        if fault.action == "stall":
                            self.wfile.write(block[:cut])
                            self.wfile.flush()
                            time.sleep(fault.seconds)
                            block = block[cut:]
                            sent += cut
                    self.wfile.write(block)
                    sent += len(block)
                self._drop_upstream()

            def _drop_upstream(self) -> None:
                if self.upstream_conn is not None:
                    self.upstream_conn.close()
                    self.upstream_conn = None

            def finish(self) -> None:
                try:
                    super().finish()
                except OSError:
                    pass
                self._drop_upstream()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
