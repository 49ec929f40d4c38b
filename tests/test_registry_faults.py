"""Registry reads and writes through a fault-injecting proxy: retries, resumes and clear failures."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest
from support.faultproxy import FaultProxy
from support.registry import LocalRegistry

from soci_helper import digest
from soci_helper.errors import DigestError, NotFound, RegistryError
from soci_helper.oci.registry import RegistryClient, RegistryOptions
from soci_helper.oci.retry import RetryPolicy, parse_retry_after

pytestmark = pytest.mark.timeout(60)

REPO = "faults/blob"
BLOB = os.urandom(3 << 20)
BLOB_DIGEST = digest.of_bytes(BLOB)


@pytest.fixture(scope="module")
def reg() -> Iterator[LocalRegistry]:
    with LocalRegistry() as r:
        with RegistryClient(r.host, RegistryOptions(plain_http=True)) as c:
            c.push_blob(REPO, BLOB_DIGEST, len(BLOB), BLOB)
        yield r


@pytest.fixture()
def proxy(reg: LocalRegistry) -> Iterator[FaultProxy]:
    with FaultProxy(reg.host) as px:
        yield px


def _client(px: FaultProxy, retries: int = 4, read_timeout: float = 2.0,
            request_timeout: float | None = 10.0) -> RegistryClient:
    return RegistryClient(px.host, RegistryOptions(
        plain_http=True, timeout=(2.0, read_timeout), request_timeout=request_timeout,
        retry=RetryPolicy(max_retries=retries, min_wait=0.01, max_wait=0.2)))


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_retried(proxy: FaultProxy, status: int) -> None:
    proxy.add("status", status=status, path="/blobs/", times=2)
    with _client(proxy) as c:
        assert c.get_blob(REPO, BLOB_DIGEST, len(BLOB)) == BLOB
    assert sum(1 for m, p, _ in proxy.seen if "/blobs/" in p) == 3


def test_429_honours_retry_after(proxy: FaultProxy) -> None:
    proxy.add("status", status=429, retry_after=1, path="/blobs/")
    with _client(proxy) as c:
        t0 = time.monotonic()
        assert c.get_blob_range(REPO, BLOB_DIGEST, 10, 100) == BLOB[10:110]
        # Our own back-off is <= 0.2 s here, so waiting >= 1 s means Retry-After was used.
        assert time.monotonic() - t0 >= 0.9
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None


def test_connection_reset_is_retried(proxy: FaultProxy) -> None:
    proxy.add("reset", path="/blobs/", times=2)
    with _client(proxy) as c:
        assert c.get_blob_range(REPO, BLOB_DIGEST, 1000, 5000) == BLOB[1000:6000]


def test_truncated_range_resumes_with_only_the_missing_bytes(proxy: FaultProxy) -> None:
    proxy.add("truncate", path="/blobs/", after_bytes=100_000)
    off, n = 4096, 1 << 20
    with _client(proxy) as c:
        assert c.get_blob_range(REPO, BLOB_DIGEST, off, n) == BLOB[off:off + n]
    ranges = [r for m, p, r in proxy.seen if "/blobs/" in p and m == "GET"]
    assert ranges == [f"bytes={off}-{off + n - 1}", f"bytes={off + 100_000}-{off + n - 1}"]


def test_truncated_whole_blob_resumes(proxy: FaultProxy) -> None:
    proxy.add("truncate", path="/blobs/", after_bytes=1_500_000)
    with _client(proxy) as c:
        assert c.get_blob(REPO, BLOB_DIGEST, len(BLOB)) == BLOB
    ranges = [r for m, p, r in proxy.seen if "/blobs/" in p and m == "GET"]
    assert ranges == [None, "bytes=1500000-"]


def test_corrupt_bytes_are_refetched_or_refused(proxy: FaultProxy) -> None:
    proxy.add("corrupt", path="/blobs/", after_bytes=12345)
    with _client(proxy) as c:
        assert c.get_blob(REPO, BLOB_DIGEST, len(BLOB)) == BLOB  # second fetch is clean
    proxy.clear()
    proxy.add("corrupt", path="/blobs/", after_bytes=12345, times=99)
    with _client(proxy) as c, pytest.raises(DigestError, match="digest mismatch"):
        c.get_blob(REPO, BLOB_DIGEST, len(BLOB))


def test_stall_hits_the_read_timeout_then_succeeds(proxy: FaultProxy) -> None:
    proxy.add("stall", path="/blobs/", seconds=3.0, after_bytes=50_000)
    with _client(proxy, read_timeout=0.5) as c:
        t0 = time.monotonic()
        assert c.get_blob_range(REPO, BLOB_DIGEST, 0, 1 << 20) == BLOB[:1 << 20]
        assert time.monotonic() - t0 < 3.0  # did not sit out the stall


def test_spent_retries_give_one_clear_error(proxy: FaultProxy, caplog) -> None:
    proxy.add("status", status=503, path="/blobs/", times=99)
    caplog.set_level(logging.DEBUG)
    with _client(proxy, retries=3) as c:
        t0 = time.monotonic()
        with pytest.raises(RegistryError) as ei:
            c.get_blob_range(REPO, BLOB_DIGEST, 0, 10)
        assert time.monotonic() - t0 < 10
    msg = str(ei.value)
    assert proxy.host in msg and REPO in msg and BLOB_DIGEST in msg and "503" in msg
    assert "4 attempts" in msg


def test_permanent_stall_fails_within_timeout(proxy: FaultProxy) -> None:
    proxy.add("stall", path="/blobs/", seconds=30.0, times=99)
    with _client(proxy, retries=1, read_timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(RegistryError, match="timed out"):
            c.get_blob_range(REPO, BLOB_DIGEST, 0, 10)
        assert time.monotonic() - t0 < 8


def test_404_is_not_retried(proxy: FaultProxy) -> None:
    with _client(proxy) as c, pytest.raises(NotFound, match="404"):
        c.get_blob_range(REPO, "sha256:" + "0" * 64, 0, 10)
    assert len([p for _, p, _ in proxy.seen if "/blobs/" in p]) == 1


def _chunked_client(px: FaultProxy) -> RegistryClient:
    return RegistryClient(px.host, RegistryOptions(
        plain_http=True, timeout=(2.0, 5.0), upload_chunk_size=256 << 10,
        retry=RetryPolicy(max_retries=4, min_wait=0.01, max_wait=0.2)))


def _requests(px: FaultProxy, method: str, part: str = "/blobs/uploads/") -> int:
    return len([1 for m, p, _ in px.seen if m == method and part in p])


@pytest.mark.parametrize("fault", ["status", "reset"])
def test_chunked_upload_resumes_where_the_registry_stands(proxy: FaultProxy, tmp_path, fault: str) -> None:
    # Three chunks; the second one fails in transit. The client asks the session how much it holds and goes
    # on from there: one upload session, one status query, the failed chunk sent again, nothing else.
    data = os.urandom(700_000)
    d = digest.of_bytes(data)
    src = tmp_path / "blob"
    src.write_bytes(data)
    proxy.add(fault, status=500, method="PATCH", nth=2)
    with _chunked_client(proxy) as c:
        assert c.push_blob(f"faults/resume-{fault}", d, len(data), src, chunked=True) is True
        assert c.get_blob(f"faults/resume-{fault}", d, len(data)) == data
    assert _requests(proxy, "POST") == 1
    assert _requests(proxy, "PATCH") == 4
    assert _requests(proxy, "GET") == 1


def test_chunked_upload_starts_over_when_the_session_is_gone(proxy: FaultProxy) -> None:
    data = os.urandom(700_000)
    d = digest.of_bytes(data)
    proxy.add("status", status=500, method="PATCH", nth=2)
    proxy.add("status", status=404, method="GET", path="/blobs/uploads/")
    with _chunked_client(proxy) as c:
        assert c.push_blob("faults/restart", d, len(data), data, chunked=True) is True
        assert c.get_blob("faults/restart", d, len(data)) == data
    assert _requests(proxy, "POST") == 2  # a fresh session after the status query failed
    assert _requests(proxy, "PATCH") == 2 + 3


def test_upload_survives_faults(proxy: FaultProxy) -> None:
    data = os.urandom(700_000)
    d = digest.of_bytes(data)
    proxy.add("status", status=500, method="PATCH", nth=2)
    proxy.add("reset", method="PUT")
    c = RegistryClient(proxy.host, RegistryOptions(
        plain_http=True, timeout=(2.0, 5.0), upload_chunk_size=256 << 10,
        retry=RetryPolicy(max_retries=4, min_wait=0.01, max_wait=0.2)))
    with c:
        assert c.push_blob("faults/up", d, len(data), data, chunked=True) is True
        assert c.get_blob("faults/up", d, len(data)) == data
