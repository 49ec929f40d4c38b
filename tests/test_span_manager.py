"""SpanManager against a real registry: correct bytes, few fetches, verification, outages, sharing, background."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import tarfile
import threading
import time
from pathlib import Path

import pytest
from support.layers import real_files_layer
from support.registry import LocalRegistry

from soci_helper.config import Config
from soci_helper.fs.spans import SpanFetchError, SpanManager
from soci_helper.fs.stats import MountStats
from soci_helper.oci.layout import OCILayout
from soci_helper.oci.registry import RegistryClient, RegistryOptions
from soci_helper.oci.retry import RetryPolicy
from soci_helper.sandbox import registry as sandbox_registry
from soci_helper.sandbox.images import write_image
from soci_helper.store.spancache import SpanCache
from soci_helper.ztoc import prefetch
from soci_helper.ztoc.builder import build_ztoc
from soci_helper.ztoc.model import Ztoc
from soci_helper.ztoc.prefetch import PrefetchArtifactError

SPAN = 1 << 20
REPO = "test/spans"


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    d = tmp_path_factory.mktemp("layer")
    tar = real_files_layer(d / "real.tar")
    desc = write_image(d / "layout", [(tar, "gzip")], "v1")
    lay = OCILayout(d / "layout")
    manifest = json.loads(lay.read_blob(desc.digest))
    digest = manifest["layers"][0]["digest"]
    blob = lay.blob_path(digest)
    with open(blob, "rb") as f:
        ztoc = build_ztoc(iter(lambda: f.read(1 << 20), b""), "gzip", SPAN, "test")
    with tarfile.open(tar) as tf:
        files = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isreg()]
    return {"dir": d, "tar": tar.read_bytes(), "layout": d / "layout", "digest": digest, "ztoc": ztoc,
            "files": files}


@pytest.fixture(scope="module")
def registry(layer):
    with LocalRegistry() as reg:
        reg.push_oci_layout(layer["layout"], f"{REPO}:v1", tag="v1")
        yield reg


def client_for(host: str) -> RegistryClient:
    # Few client-side retries: the SpanManager's own deadline is what is under test.
    return RegistryClient(host, RegistryOptions(plain_http=True, timeout=(2.0, 5.0),
                                                retry=RetryPolicy(1, 0.01, 0.05)))


class Blobs:
    """Range requests the manager makes, and what the registry answered, counted per test."""

    def __init__(self, reg: LocalRegistry, digest: str) -> None:
        self.reg = reg
        self.digest = digest
        self.client = client_for(reg.host)
        self.calls = 0
        self._mark = len(self._gets())

    def fetch(self, off: int, n: int) -> bytes:
        self.calls += 1
        return self.client.get_blob_range(REPO, self.digest, off, n)

    def fetch_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.calls += 1
        return self.client.get_blob_ranges(REPO, self.digest, ranges)

    def _gets(self) -> list:
        return [e for e in self.reg.access_log() if e.method == "GET" and "/blobs/" in e.path]

    def requests(self, settle: float = 0.2) -> list:
        """Blob GETs the registry logged since this object was made (its log lags a little)."""
        time.sleep(settle)
        return self._gets()[self._mark:]

    def close(self) -> None:
        self.client.close()


def config(**blob: int) -> Config:
    cfg = Config()
    cfg.blob.fetching_timeout_sec = blob.get("timeout", 10)
    cfg.blob.max_span_verification_retries = blob.get("retries", 2)
    cfg.background_fetch.disable = True
    return cfg


@pytest.fixture
def blobs(registry, layer):
    b = Blobs(registry, layer["digest"])
    yield b
    b.close()


def manager(layer, cache_root: Path, fetch, cfg: Config | None = None, **kw) -> SpanManager:
    return SpanManager(layer["ztoc"], layer["digest"], fetch, SpanCache(cache_root), cfg or config(), **kw)


def compressed_len(ztoc_span_mgr: SpanManager, sid: int) -> int:
    return ztoc_span_mgr._c_end[sid] - ztoc_span_mgr._c_start[sid]


def small_file(layer, min_size: int = 2000) -> tuple[str, int, int]:
    """A small file well inside the layer, not crossing a span boundary."""
    for name, off, size in layer["files"][len(layer["files"]) // 2:]:
        if min_size <= size < 64 << 10 and off // SPAN == (off + size - 1) // SPAN:
            return name, off, size
    raise AssertionError("no small file found")


def test_every_file_equals_the_tar_and_a_second_mount_reads_the_cache(tmp_path, layer, blobs):
    tar = layer["tar"]
    with manager(layer, tmp_path, blobs.fetch, fetch_many=blobs.fetch_many) as m:
        assert m.num_spans == len(layer["ztoc"].span_digests) > 10
        served = 0
        for name, off, size in layer["files"]:
            assert m.read(off, size) == tar[off:off + size], name
            served += size
        # Spans straddling file boundaries and whole-layer edge cases.
        assert m.read(SPAN - 100, 300) == tar[SPAN - 100:SPAN + 200]
        assert m.read(m.size - 10, 100) == tar[m.size - 10:m.size]
        assert m.read(m.size, 10) == b""
        s = m.stats.snapshot()
        assert s["bytes_served"] == served + 300 + 10
        assert s["spans_fetched"] == m.num_spans  # each span fetched exactly once
        assert s["verify_failures"] == 0
        # Spans starting mid-byte share that byte with the previous span.
        assert s["bytes_fetched"] == sum(compressed_len(m, i) for i in range(m.num_spans))
    fetched = blobs.calls
    with manager(layer, tmp_path, blobs.fetch) as again:
        assert again.read(0, again.size) == tar[:again.size]
        assert again.stats.cache_hits == again.num_spans and again.stats.spans_fetched == 0
    assert blobs.calls == fetched


def test_read_buffer_serves_part_of_a_span_and_joins_across_spans(tmp_path, layer, blobs):
    _, off, size = small_file(layer)
    with manager(layer, tmp_path, blobs.fetch) as m:
        part = m.read_buffer(off, size)
        assert isinstance(part, (bytes, memoryview)) and part == layer["tar"][off:off + size]
        edge = m.span_range(1)[0]
        across = m.read_buffer(edge - 100, 200)
        assert bytes(across) == layer["tar"][edge - 100:edge + 100]
        assert m.read(off, size) == layer["tar"][off:off + size] and type(m.read(off, size)) is bytes


def test_spans_are_served_from_the_disk_cache_not_kept_in_memory(tmp_path, layer, blobs):
    _, off, size = small_file(layer)
    with manager(layer, tmp_path, blobs.fetch) as m:
        sid = m.zinfo.span_of(off)
        assert not m.ready(off, size)
        assert m.read(off, size) == layer["tar"][off:off + size]
        # Inflated into the cache, read back from it; the entry stays open, so the next read is one pread.
        assert not m._mem and m.is_cached(sid) and m.ready(off, size)
        hits = m.stats.cache_hits
        assert m.read(off, size) == layer["tar"][off:off + size]
        assert m.stats.cache_hits == hits + 1 and m.stats.spans_fetched == 1
    # Another process's view: the entry is on disk but not open.
    with manager(layer, tmp_path, blobs.fetch) as again:
        assert not again.ready(off, size)
        assert again.read(off, size) == layer["tar"][off:off + size]
        assert again.stats.spans_fetched == 0 and again.stats.cache_hits == 1


def test_spans_the_cache_refuses_are_kept_in_memory(tmp_path, layer, blobs):
    _, off, size = small_file(layer)
    cache = SpanCache(tmp_path, max_size=1 << 10)  # smaller than any span
    with SpanManager(layer["ztoc"], layer["digest"], blobs.fetch, cache, config()) as m:
        assert m.read(off, size) == layer["tar"][off:off + size]
        assert m.ready(off, size) and not m.is_cached(m.zinfo.span_of(off))
        assert m.read(off, size) == layer["tar"][off:off + size] and m.stats.spans_fetched == 1
        m.release_memory()
        assert not m.ready(off, size)
        assert m.read(off, size) == layer["tar"][off:off + size] and m.stats.spans_fetched == 2


class EvictingCache(SpanCache):
    """Another process evicts every entry the moment it is written."""

    def _adopt(self, p, fd, length, crcs):
        super()._adopt(p, fd, length, crcs)
        p.unlink()
        self._forget(p)


def test_a_span_evicted_right_after_its_load_is_loaded_again_into_memory(tmp_path, layer, blobs):
    _, off, size = small_file(layer)
    with SpanManager(layer["ztoc"], layer["digest"], blobs.fetch, EvictingCache(tmp_path), config()) as m:
        assert m.read(off, size) == layer["tar"][off:off + size]
        assert m.stats.spans_fetched == 2 and m.ready(off, size)


def test_small_cold_file_fetches_at_most_two_spans_in_one_request(tmp_path, layer, blobs):
    name, off, size = small_file(layer)
    with manager(layer, tmp_path, blobs.fetch) as m:
        sid = m.zinfo.span_of(off)
        assert not m.ready(off, size)
        assert m.read(off, size) == layer["tar"][off:off + size]
        # The filesystem serves such reads without a thread hop; a span never read is not ready.
        assert m.ready(off, size) and not m.ready(m.span_range(sid + 2)[0], 1)
        gets = blobs.requests()
        assert len(gets) == 1 and gets[0].status == 206
        assert gets[0].size == compressed_len(m, sid)
        assert m.stats.spans_fetched == 1
        # A read across a span boundary: two spans, still one request.
        boundary = m.span_range(sid + 2)[0]
        assert m.read(boundary - 10, 20) == layer["tar"][boundary - 10:boundary + 10]
        gets = blobs.requests()
        assert len(gets) == 2
        assert gets[1].size == m._c_end[sid + 2] - m._c_start[sid + 1]
    with manager(layer, tmp_path / "many", blobs.fetch, fetch_many=blobs.fetch_many) as m:
        boundary = m.span_range(3)[0]
        before = len(blobs.requests(settle=0))
        assert m.read(boundary - 10, 20) == layer["tar"][boundary - 10:boundary + 10]
        assert len(blobs.requests()) == before + 1


def test_corrupted_span_is_retried_then_refused(tmp_path, layer, blobs, caplog):
    name, off, size = small_file(layer)
    attempts = {"n": 0, "bad": 100}

    def corrupting(o: int, n: int) -> bytes:
        attempts["n"] += 1
        data = bytearray(blobs.fetch(o, n))
        if attempts["bad"] > 0:
            attempts["bad"] -= 1
            data[len(data) // 2] ^= 0x01
        return bytes(data)

    cfg = config(retries=2)
    with manager(layer, tmp_path, corrupting, cfg) as m:
        with caplog.at_level("ERROR", logger="soci_helper.fs.spans"), pytest.raises(SpanFetchError):
            m.read(off, size)
        assert attempts["n"] == 3 and m.stats.verify_failures == 3
        assert len([r for r in caplog.records if "verification" in r.getMessage()]) == 1
        assert m.stats.bytes_served == 0
        assert m.cache.usage() == 0
        # A proxy that corrupts once: the retry gets good bytes and the read succeeds.
        attempts.update(n=0, bad=1)
        assert m.read(off, size) == layer["tar"][off:off + size]
        assert attempts["n"] == 2 and m.stats.verify_failures == 4


def test_damaged_cache_entry_is_refetched(tmp_path, layer, blobs):
    name, off, size = small_file(layer)
    with manager(layer, tmp_path, blobs.fetch) as m:
        m.read(off, size)
        sid = m.zinfo.span_of(off)
        us, ue = m.span_range(sid)
        p = m.cache.path(m.layer, us, ue - us)
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))
    with manager(layer, tmp_path, blobs.fetch) as m:
        assert m.read(ue - 1, 1) == layer["tar"][ue - 1:ue]
        assert m.stats.spans_fetched == 1 and m.stats.cache_hits == 0
    assert p.read_bytes()[-1] == layer["tar"][ue - 1]


def test_damage_to_an_open_entry_is_caught_by_the_block_checksum(tmp_path, layer, blobs, caplog):
    name, off, size = small_file(layer)
    with manager(layer, tmp_path, blobs.fetch) as m:
        m.read(off, size)
        sid = m.zinfo.span_of(off)
        us, ue = m.span_range(sid)
        assert m.ready(ue - 1, 1)
        # Flipped in place: the server's open descriptor sees it too.
        with open(m.cache.path(m.layer, us, ue - us), "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)[0]
            f.seek(-1, 2)
            f.write(bytes([last ^ 0xFF]))
        with caplog.at_level("WARNING", logger="soci_helper.store.spancache"):
            # (Limited to the span, so that no read-ahead joins in.)
            assert m.read(ue - 1, 1, ahead_limit=ue) == layer["tar"][ue - 1:ue]
        assert m.stats.spans_fetched == 2
        assert any("checksum mismatch" in r.getMessage() for r in caplog.records)


def test_registry_outage_fails_within_the_bound_and_recovers(tmp_path, layer, registry, monkeypatch):
    # A second registry on a copy of the storage, so stopping it leaves the shared one alone.
    work = tmp_path / "reg"
    work.mkdir()
    assert registry.dir is not None
    shutil.copytree(registry.dir / "storage", work / "storage")
    reg = LocalRegistry(workdir=work)
    reg.start()
    b = Blobs(reg, layer["digest"])
    try:
        with manager(layer, tmp_path / "cache", b.fetch, config(timeout=1)) as m:
            _, off, size = small_file(layer)
            assert m.read(off, size) == layer["tar"][off:off + size]
            port = reg.port
            reg.stop()
            t0 = time.monotonic()
            with pytest.raises(SpanFetchError):
                m.read(0, 100)
            assert time.monotonic() - t0 < 4
            assert m.read(off, 10) == layer["tar"][off:off + 10]  # cached spans still serve
            # LocalRegistry picks its port with _free_port: come back on the same address, as a registry would.
            monkeypatch.setattr(sandbox_registry, "_free_port", lambda: port)
            reg.start()
            assert reg.port == port
            assert m.read(0, 100) == layer["tar"][:100]
    finally:
        b.close()
        reg.stop()


def test_two_managers_fetch_a_cold_span_once(tmp_path, layer, blobs):
    _, off, size = small_file(layer)
    ms = [manager(layer, tmp_path, blobs.fetch) for _ in range(2)]
    start = threading.Barrier(4)
    results: list[bytes] = []

    def reader(m: SpanManager) -> None:
        start.wait(5)
        results.append(m.read(off, size))

    threads = [threading.Thread(target=reader, args=(m,)) for m in ms for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert results == [layer["tar"][off:off + size]] * 4
        assert sum(m.stats.spans_fetched for m in ms) == 1
        assert len(blobs.requests()) == 1
    finally:
        for m in ms:
            m.close()


def _child(ztoc: Ztoc, digest: str, host: str, root: str, off: int, size: int, barrier, out) -> None:
    c = client_for(host)
    m = SpanManager(ztoc, digest, lambda o, n: c.get_blob_range(REPO, digest, o, n), SpanCache(root), config())
    barrier.wait(30)
    data = m.read(off, size)
    out.put((hashlib.sha256(data).hexdigest(), m.stats.spans_fetched))
    m.close()
    c.close()


def test_two_processes_fetch_a_cold_span_once(tmp_path, layer, blobs):
    _, off, size = small_file(layer)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(layer["ztoc"], layer["digest"], blobs.reg.host, str(tmp_path),
                                              off, size, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        got = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    want = hashlib.sha256(layer["tar"][off:off + size]).hexdigest()
    assert [h for h, _ in got] == [want, want]
    assert sorted(n for _, n in got) == [0, 1]
    assert len(blobs.requests()) == 1


def test_sequential_reads_fetch_spans_ahead(tmp_path, layer, blobs):
    with manager(layer, tmp_path, blobs.fetch) as m:
        chunk = 128 << 10
        first = 2
        pos = m.span_range(first)[0]
        for _ in range(3):
            assert m.read(pos, chunk) == layer["tar"][pos:pos + chunk]
            pos += chunk
        ahead = range(first + 1, first + 1 + m.READAHEAD_SPANS)
        deadline = time.monotonic() + 10
        while not all(m.is_cached(s) for s in ahead) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(m.is_cached(s) for s in ahead)
        assert not m.is_cached(first + 1 + m.READAHEAD_SPANS + 1)
    # Not past the end of the file being read: a sequential read of a file ending in span `first` stops there.
    with manager(layer, tmp_path / "bounded", blobs.fetch) as m:
        chunk = 128 << 10
        pos = m.span_range(first)[0]
        file_end = pos + 4 * chunk
        while pos < file_end:
            assert m.read(pos, chunk, ahead_limit=file_end) == layer["tar"][pos:pos + chunk]
            pos += chunk
        time.sleep(0.3)
        assert m.stats.spans_fetched == 1 and not m.is_cached(first + 1)
        # ...while a file reaching into the next spans still gets them ahead, and no further.
        end2 = m.span_range(first + 2)[0] + 10
        for _ in range(2):
            assert m.read(pos, chunk, ahead_limit=end2) == layer["tar"][pos:pos + chunk]
            pos += chunk
        deadline = time.monotonic() + 10
        while not (m.is_cached(first + 1) and m.is_cached(first + 2)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.is_cached(first + 1) and m.is_cached(first + 2) and not m.is_cached(first + 3)
    # Random reads do not trigger it.
    with manager(layer, tmp_path / "random", blobs.fetch) as m:
        for sid in (8, 2, 12):
            s = m.span_range(sid)[0]
            m.read(s, 100)
        time.sleep(0.2)
        assert m.stats.spans_fetched == 3


def test_prefetch_fetches_ranges_and_artifact_spans(tmp_path, layer, blobs):
    files = layer["files"][:: max(1, len(layer["files"]) // 5)][:5]
    with manager(layer, tmp_path, blobs.fetch) as m:
        order = [s for _, off, size in files for s in m.spans_of(off, size)]
        m.start_prefetch(order).join(20)
        want = set(order)
        assert all(m.is_cached(s) for s in want)
        assert m.stats.spans_fetched == len(want) and m.stats.bytes_served == 0
        art = json.dumps({"version": "1.0", "prefetch_spans": [{"start_span": 9, "end_span": 11}]}).encode()
        m.start_prefetch(prefetch.fetch_order(prefetch.decode(art, m.num_spans - 1))).join(20)
        assert all(m.is_cached(s) for s in (9, 10, 11))
        requests = len(blobs.requests())
        for _, off, size in files:
            assert m.read(off, size) == layer["tar"][off:off + size]
        assert len(blobs.requests()) == requests


def spans_listed(data: bytes, max_span_id: int | None = None) -> list[int]:
    return sorted(prefetch.fetch_order(prefetch.decode(data, max_span_id)))


def test_prefetch_artifact_validation():
    ok = b'{"version":"1.0","prefetch_spans":[{"start_span":3,"end_span":5},{"start_span":0,"end_span":0},' \
         b'{"start_span":4,"end_span":6}]}'
    assert spans_listed(ok) == [0, 3, 4, 5, 6]
    assert spans_listed(b'{"version":"1.0","prefetch_spans":[]}') == []
    bad = [
        b"not json",
        b"[]",
        b'{"version":"2.0","prefetch_spans":[]}',
        b'{"version":"1.0"}',
        b'{"version":"1.0","prefetch_spans":[1]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":"1","end_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":true,"end_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":-1,"end_span":2}]}',
        b'{"version":"1.0","prefetch_spans":[{"start_span":5,"end_span":2}]}',
        b"\xff\xfe",
    ]
    for data in bad:
        with pytest.raises(PrefetchArtifactError):
            spans_listed(data)
    with pytest.raises(PrefetchArtifactError, match="last is 5"):
        spans_listed(ok, max_span_id=5)


def test_read_wait_counts_only_reads_that_waited_for_a_span(tmp_path, layer, blobs):
    _, off, size = small_file(layer)

    def slow(o: int, n: int) -> bytes:
        time.sleep(0.05)
        return blobs.fetch(o, n)

    with manager(layer, tmp_path, slow) as m:
        assert m.read(off, size) == layer["tar"][off:off + size]
        waited = m.stats.read_wait_us
        assert waited >= 50_000
        assert m.read(off, size) == layer["tar"][off:off + size]  # from the span cache: no wait
        assert m.stats.read_wait_us == waited
        assert json.loads(m.stats.to_json())["read_wait_us"] == waited


def test_prefetch_artifact_priorities_order_round_trip():
    items = prefetch.from_order([7, 8, 2, 9, 3, 8, 4])
    # Ascending neighbours share a range; each range's priority is its place in the order.
    assert [(p.start, p.end, p.priority) for p in items] == [(7, 8, 0), (2, 2, 1), (9, 9, 2), (3, 4, 3)]
    blob = prefetch.encode(items)
    assert blob.startswith(b'{"version":"1.0","prefetch_spans":[{"start_span":7,"end_span":8},'
                           b'{"start_span":2,"end_span":2,"priority":1}')
    assert prefetch.decode(blob) == items
    assert prefetch.fetch_order(prefetch.decode(blob)) == [7, 8, 2, 9, 3, 4]
    # Upstream's artifacts without priorities keep their listed order.
    plain = b'{"version":"1.0","prefetch_spans":[{"start_span":5,"end_span":5},{"start_span":1,"end_span":2}]}'
    assert prefetch.fetch_order(prefetch.decode(plain)) == [5, 1, 2]
    with pytest.raises(PrefetchArtifactError, match="priority"):
        prefetch.decode(b'{"version":"1.0","prefetch_spans":[{"start_span":1,"end_span":2,"priority":"a"}]}')
    with pytest.raises(PrefetchArtifactError, match="at least one"):
        prefetch.encode([])


def test_start_prefetch_fetches_in_the_given_order_and_reads_find_the_spans(tmp_path, layer, blobs):
    order = [9, 10, 3, 12, 0]
    fetched: list[int] = []

    def fetch(off: int, n: int) -> bytes:
        fetched.append(off)
        return blobs.fetch(off, n)

    with manager(layer, tmp_path, fetch) as m:
        m.PREFETCH_THREADS = 1  # one request at a time, so the registry sees the order itself
        t = m.start_prefetch(order)
        assert t is not None
        t.join(30)
        assert not t.is_alive()
        firsts = [next(s for s in range(m.num_spans) if m._c_start[s] == off) for off in fetched]
        assert firsts == [9, 3, 12, 0]  # 9 and 10 in one request
        assert all(m.is_cached(s) for s in order)
        assert m.stats.bytes_served == 0
        calls = len(fetched)
        for sid in order:  # a short read of each (a whole span read in order would start read-ahead)
            start = m.span_range(sid)[0] + 10
            assert m.read(start, 1000) == layer["tar"][start:start + 1000]
        assert len(fetched) == calls
        assert m.start_prefetch([m.num_spans + 5, -1]) is None  # nothing of this layer: no thread


def test_background_fetch_waits_for_quiet_then_fetches_all_at_the_bounded_rate(tmp_path, layer, blobs):
    cfg = config()
    cfg.background_fetch.disable = False
    cfg.background_fetch.silence_period_msec = 300
    cfg.background_fetch.fetch_period_msec = 20
    with manager(layer, tmp_path, blobs.fetch, cfg) as m:
        _, off, size = small_file(layer)
        m.read(off, size)
        m.start_background_fetch()
        bg = m.background
        assert bg is not None
        # Foreground activity keeps it paused.
        for _ in range(8):
            m.note_activity()
            time.sleep(0.05)
        assert m.stats.spans_fetched == 1
        t0 = time.monotonic()
        assert bg.done.wait(30)  # type: ignore[attr-defined]
        elapsed = time.monotonic() - t0
        assert all(m.is_cached(s) for s in range(m.num_spans))
        assert m.stats.spans_fetched == m.num_spans
        # One span per period at most, after the silence period.
        assert elapsed >= 0.3 + (m.num_spans - 2) * 0.02
        assert not bg._thread.is_alive() or bg._thread.join(2) is None  # type: ignore[attr-defined]
    cfg.background_fetch.disable = True
    with manager(layer, tmp_path / "off", blobs.fetch, cfg) as m:
        m.start_background_fetch()
        assert m.background is None


def test_closed_manager_refuses_reads(tmp_path, layer, blobs):
    m = manager(layer, tmp_path, blobs.fetch)
    m.close()
    with pytest.raises(SpanFetchError):
        m.read(0, 10)


def test_stats_json_and_atomic_publish(tmp_path):
    s = MountStats()
    s.add(bytes_served=10, cache_hits=2)
    s.add(bytes_served=5)
    doc = json.loads(s.to_json(layer="sha256:x"))
    assert doc["bytes_served"] == 15 and doc["cache_hits"] == 2 and doc["layer"] == "sha256:x"
    assert doc["verify_failures"] == 0
    s.write_atomically(tmp_path / "m" / "stats.json", layer="sha256:x")
    assert json.loads((tmp_path / "m" / "stats.json").read_text()) == doc
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["stats.json"]
    with pytest.raises(AttributeError):
        s.add(nonsense=1)


@pytest.fixture(scope="module")
def big_files(tmp_path_factory, registry):
    """A layer of big random files among small ones, indexed with 64 KiB head spans, in the registry."""
    import io
    import os

    d = tmp_path_factory.mktemp("bigfiles")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(6):
            for name, size in ((f"small{i}", 3000 + i), (f"model{i}.bin", SPAN * 2 + 12345 * i)):
                info = tarfile.TarInfo(name)
                info.size = size
                t.addfile(info, io.BytesIO(os.urandom(size)))
    tar = d / "big.tar"
    tar.write_bytes(buf.getvalue())
    desc = write_image(d / "layout", [(tar, "gzip")], "v1")
    lay = OCILayout(d / "layout")
    digest = json.loads(lay.read_blob(desc.digest))["layers"][0]["digest"]
    with open(lay.blob_path(digest), "rb") as f:
        ztoc = build_ztoc(iter(lambda: f.read(1 << 20), b""), "gzip", SPAN, "test", head_span=64 << 10)
    registry.push_oci_layout(d / "layout", f"{REPO}:big", tag="v1")
    with tarfile.open(tar) as tf:
        files = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isreg()]
    return {"ztoc": ztoc, "digest": digest, "tar": tar.read_bytes(), "files": files}


def test_heads_of_big_files_are_fetched_ahead_with_background_fetch(tmp_path, big_files, registry):
    b = Blobs(registry, big_files["digest"])
    cfg = config()
    cfg.background_fetch.disable = False
    cfg.background_fetch.silence_period_msec = 60_000  # only the heads, not the rest, within this test
    try:
        with manager(big_files, tmp_path, b.fetch, cfg) as m:
            heads = m.head_spans()
            models = [(off, size) for name, off, size in big_files["files"] if name.startswith("model")]
            assert heads == [m.spans_of(off, 1)[0] for off, _ in models]
            assert all(m.span_range(s)[1] - m.span_range(s)[0] < SPAN // 2 for s in heads)
            m.start_background_fetch()
            deadline = time.monotonic() + 20
            while not all(m.is_cached(s) for s in heads) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [s for s in range(m.num_spans) if m.is_cached(s)] == heads
            fetched = m.stats.spans_fetched
            assert fetched == len(heads)
            tar = big_files["tar"]
            for off, _ in models:  # each head is served from the cache: no more fetches
                assert m.read(off, 4096) == tar[off:off + 4096]
            assert m.stats.spans_fetched == fetched
        cfg.background_fetch.disable = True
        with manager(big_files, tmp_path / "off", b.fetch, cfg) as m:
            m.start_background_fetch()
            time.sleep(0.5)
            assert m.stats.spans_fetched == 0
    finally:
        b.close()
