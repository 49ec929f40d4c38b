"""RegistryClient against a real plain-HTTP registry and small fake servers: tags, referrers, ranges, uploads."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from support.registry import LocalRegistry

from soci_helper import config, digest
from soci_helper.errors import NotFound, RegistryError
from soci_helper.oci import mediatype as mt
from soci_helper.oci.auth import Credentials
from soci_helper.oci.registry import RegistryClient, RegistryOptions, merge_ranges
from soci_helper.oci.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)

BLOB = os.urandom(1 << 20)
BLOB_DIGEST = digest.of_bytes(BLOB)


@pytest.fixture(scope="module")
def reg() -> Iterator[LocalRegistry]:
    with LocalRegistry() as r:
        yield r


@pytest.fixture(scope="module")
def client(reg: LocalRegistry) -> Iterator[RegistryClient]:
    with RegistryClient(reg.host, RegistryOptions(plain_http=True)) as c:
        assert c.push_blob("cl/blob", BLOB_DIGEST, len(BLOB), BLOB) is True
        yield c


def _manifest(c: RegistryClient, repo: str, tag: str, subject: dict[str, Any] | None = None) -> str:
    cfg = b"{}"
    c.push_blob(repo, digest.of_bytes(cfg), len(cfg), cfg)
    m: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                         "config": {"mediaType": "application/vnd.test+json",
                                    "digest": digest.of_bytes(cfg), "size": 2},
                         "layers": [], "annotations": {"t": tag}}
    if subject:
        m["subject"] = subject
    data = json.dumps(m).encode()
    return c.put_manifest(repo, tag, data, mt.OCI_MANIFEST).digest


def test_tags_delete_and_referrers(client: RegistryClient) -> None:
    d1 = _manifest(client, "cl/tags", "one")
    _manifest(client, "cl/tags", "two")
    assert sorted(client.list_tags("cl/tags")) == ["one", "two"]
    assert client.list_tags("cl/never-pushed") == []
    # distribution 2.8 has no referrers API: None, not an error.
    assert client.get_referrers("cl/tags", d1, "application/vnd.amazon.soci.index.v1+json") is None
    client.delete_manifest("cl/tags", d1)
    assert client.head_manifest("cl/tags", d1) is None
    with pytest.raises(NotFound):
        client.delete_manifest("cl/tags", d1)


def test_a_registry_without_referrers_keeps_the_connection(reg: LocalRegistry,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    # Discovery asks the referrers API, then falls back to the tag: the 404 must not cost a new connection.
    with RegistryClient(reg.host, RegistryOptions(plain_http=True)) as c:
        d1 = _manifest(c, "cl/conn", "one")
        with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
            for _ in range(3):
                assert c.get_referrers("cl/conn", d1, "application/vnd.amazon.soci.index.v1+json") is None
                assert c.get_manifest("cl/conn", "one")[1].digest == d1
        messages = [r.getMessage() for r in caplog.records if r.name == "urllib3.connectionpool"]
        assert sum("GET /v2/cl/conn/" in m for m in messages) == 6
        assert not any("dropped connection" in m or "new HTTP connection" in m for m in messages), messages


def test_ranges_and_merged_ranges(client: RegistryClient, reg: LocalRegistry) -> None:
    assert client.get_blob_range("cl/blob", BLOB_DIGEST, 5, 10) == BLOB[5:15]
    assert client.get_blob_range("cl/blob", BLOB_DIGEST, len(BLOB) - 3, 10) == BLOB[-3:]
    assert merge_ranges([(10, 5), (0, 10), (100, 1), (12, 20), (50, 0)]) == [(0, 32), (100, 1)]
    before = len(reg.access_log())
    want = [(100, 50), (0, 100), (120, 80), (5000, 10), (len(BLOB) - 4, 100)]
    got = client.get_blob_ranges("cl/blob", BLOB_DIGEST, want)
    assert got == [BLOB[o:o + n] for o, n in want]
    gets = [e for e in reg.access_log()[before:] if e.method == "GET"]
    assert len(gets) == 3  # [0,200) merged, 5000+10, the tail


def test_chunked_upload_and_mount(client: RegistryClient, reg: LocalRegistry, tmp_path) -> None:
    data = os.urandom(300_000)
    d = digest.of_bytes(data)
    p = tmp_path / "blob"
    p.write_bytes(data)
    small = RegistryClient(reg.host, RegistryOptions(plain_http=True, upload_chunk_size=64 << 10))
    with small:
        before = len(reg.access_log())
        assert small.push_blob("cl/up", d, len(data), p, chunked=True) is True
        patches = [e for e in reg.access_log()[before:] if e.method == "PATCH"]
        assert len(patches) == 5
        assert small.push_blob("cl/up", d, len(data), p) is False  # already there
        assert small.push_blob("cl/mounted", d, len(data), p, mount_from="cl/up") is True
        mounted = [e for e in reg.access_log() if e.method == "POST" and "mount=" in e.path]
        assert mounted and mounted[-1].status == 201
        # Mount from a repository without the blob: 202, then a normal upload.
        other = os.urandom(1000)
        od = digest.of_bytes(other)
        assert small.push_blob("cl/m2", od, len(other), other, mount_from="cl/nothing") is True
        assert small.get_blob("cl/m2", od, len(other)) == other
        assert small.get_blob("cl/mounted", d, len(data)) == data


class _Redirector(BaseHTTPRequestHandler):
    """A registry that wants Basic auth and redirects blob GETs to storage on another address."""

    protocol_version = "HTTP/1.1"
    storage = ""

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Basic dTpzM2NyZXQtcmVkaXI=":  # u:s3cret-redir
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="t"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(307)
        self.send_header("Location", f"http://{self.storage}/data/{BLOB_DIGEST}?sig=abc")
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Storage(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen_auth: list[str | None] = []

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        _Storage.seen_auth.append(self.headers.get("Authorization"))
        rng = self.headers.get("Range")
        body, status, extra = BLOB, 200, {}
        if rng:
            a, b = rng.split("=")[1].split("-")
            start, end = int(a), (int(b) if b else len(BLOB) - 1)
            body, status = BLOB[start:end + 1], 206
            extra["Content-Range"] = f"bytes {start}-{end}/{len(BLOB)}"
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(handler: type, addr: str) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer((addr, 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_redirect_drops_authorization() -> None:
    storage = _serve(_Storage, "127.0.0.2")
    _Redirector.storage = f"127.0.0.2:{storage.server_address[1]}"
    front = _serve(_Redirector, "127.0.0.1")
    try:
        opts = RegistryOptions(plain_http=True, credentials=Credentials("u", "s3cret-redir"))
        with RegistryClient(f"127.0.0.1:{front.server_address[1]}", opts) as c:
            assert c.get_blob("r/r", BLOB_DIGEST, len(BLOB)) == BLOB
            assert c.get_blob_range("r/r", BLOB_DIGEST, 10, 20) == BLOB[10:30]
        assert _Storage.seen_auth and all(a is None for a in _Storage.seen_auth)
    finally:
        for s in (front, storage):
            s.shutdown()
            s.server_close()


class _IgnoresRange(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/v2/t/tags/list"):
            page = 2 if "last=" in self.path else 1
            body = json.dumps({"name": "t", "tags": ["a", "b"] if page == 1 else ["c"]}).encode()
            self.send_response(200)
            if page == 1:
                self.send_header("Link", '</v2/t/tags/list?n=2&last=b>; rel="next"')
        else:
            body = BLOB
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the client hangs up once it has what it needs


def test_server_ignoring_range_and_tag_pagination() -> None:
    srv = _serve(_IgnoresRange, "127.0.0.1")
    try:
        with RegistryClient(f"127.0.0.1:{srv.server_address[1]}", RegistryOptions(plain_http=True)) as c:
            assert c.get_blob_range("t", BLOB_DIGEST, 1000, 300) == BLOB[1000:1300]
            assert c.get_blob_range("t", BLOB_DIGEST, len(BLOB) - 5, 50) == BLOB[-5:]
            assert c.list_tags("t", page_size=2) == ["a", "b", "c"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_options_from_config_and_mirror_fallback(reg: LocalRegistry, client: RegistryClient) -> None:
    with LocalRegistry() as mirror:
        cfg = config.parse(f"""
[http]
MaxRetries = 2
MinWaitMsec = 10
DialTimeoutMsec = 1500
ResponseHeaderTimeoutMsec = 2500
RequestTimeoutMsec = 9000

[[resolver.host."{reg.host}".mirrors]]
host = "127.0.0.1:9"
insecure = true

[[resolver.host."{reg.host}".mirrors]]
host = "http://{mirror.host}"
""")
        opts = RegistryOptions.from_config(cfg, reg.host, plain_http=True)
        assert opts.timeout == (1.5, 2.5) and opts.request_timeout == 9.0
        assert opts.retry == RetryPolicy(2, 0.01, 300.0)
        assert [m.host for m in opts.mirrors] == ["127.0.0.1:9", mirror.host]
        with RegistryClient(mirror.host, RegistryOptions(plain_http=True)) as mc:
            only = os.urandom(100)
            mc.push_blob("cl/blob", digest.of_bytes(only), 100, only)
        with RegistryClient(reg.host, opts) as c:
            # The first mirror is unreachable, the second serves what it has, the registry the rest.
            assert c.get_blob("cl/blob", digest.of_bytes(only), 100) == only
            assert c.get_blob("cl/blob", BLOB_DIGEST, len(BLOB)) == BLOB
        assert any(digest.of_bytes(only) in e.path for e in mirror.access_log())


def test_whole_blob_reads_keep_the_connection(client: RegistryClient, reg: LocalRegistry,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A blob read to its end leaves its connection in the pool: the next request does not connect again."""
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    with RegistryClient(reg.host, RegistryOptions(plain_http=True)) as c:
        small = b'{"small": "config"}'
        c.push_blob("cl/keep", digest.of_bytes(small), len(small), small)  # connects once
        caplog.clear()
        for _ in range(2):
            assert c.get_blob("cl/blob", BLOB_DIGEST, len(BLOB)) == BLOB
            assert c.get_blob("cl/keep", digest.of_bytes(small)) == small
            assert c.get_blob_range("cl/blob", BLOB_DIGEST, 10, 20) == BLOB[10:30]
    connects = [r.getMessage() for r in caplog.records
                if r.getMessage().startswith(("Starting new", "Resetting dropped"))]
    assert connects == []


class _ForwardProxy(BaseHTTPRequestHandler):
    """An HTTP proxy that answers for the registry itself: requests arrive in absolute form."""

    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def log_message(self, *a: Any) -> None:
        pass

    def do_GET(self) -> None:
        _ForwardProxy.seen.append(self.path)
        body = BLOB
        status = 200
        rng = self.headers.get("Range")
        if rng:
            lo, hi = (int(x) for x in rng.split("=")[1].split("-"))
            body, status = BLOB[lo:hi + 1], 206
        self.send_response(status)
        if rng:
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(BLOB)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_proxy_environment_is_honoured_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _serve(_ForwardProxy, "127.0.0.1")
    _ForwardProxy.seen = []
    target = "127.0.0.3:9"  # nothing listens there: only the proxy can answer
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
    try:
        opts = RegistryOptions(plain_http=True, retry=RetryPolicy(max_retries=0))
        with RegistryClient(target, opts) as c:
            for off in (10, 5000, 70_000):  # the environment is read once; every request still takes the proxy
                assert c.get_blob_range("p/p", BLOB_DIGEST, off, 100) == BLOB[off:off + 100]
        assert len(_ForwardProxy.seen) == 3
        assert all(p.startswith(f"http://{target}/v2/p/p/blobs/{BLOB_DIGEST}") for p in _ForwardProxy.seen)
        monkeypatch.setenv("no_proxy", "127.0.0.3")
        with RegistryClient(target, opts) as c, pytest.raises(RegistryError, match=target):
            c.get_blob_range("p/p", BLOB_DIGEST, 10, 100)
        assert len(_ForwardProxy.seen) == 3
    finally:
        proxy.shutdown()
        proxy.server_close()
