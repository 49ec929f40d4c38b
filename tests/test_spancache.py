"""The on-disk span cache: integrity checks, LRU eviction within budget, restarts, disk-full handling."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

import pytest

from soci_helper.store import spancache as sc
from soci_helper.store.spancache import BLOCK, SpanCache, SpanCacheLockTimeout, entry_size, payload_offset

LAYER = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
SIZE = 64 << 10


def payload(i: int, n: int = SIZE) -> bytes:
    return (f"span-{i:04d}-".encode() * (n // 10 + 1))[:n]


def test_roundtrip_and_survives_a_new_instance(tmp_path):
    c = SpanCache(tmp_path)
    assert c.get(LAYER, 0, SIZE) is None
    assert c.put(LAYER, 0, payload(0))
    assert c.put(LAYER, SIZE, payload(1))
    assert c.put(OTHER, 0, payload(2))
    assert c.get(LAYER, 0, SIZE) == payload(0)
    # The key includes the length: the same start with another length is another entry.
    assert c.get(LAYER, 0, SIZE - 1) is None
    again = SpanCache(tmp_path)
    assert again.get(LAYER, SIZE, SIZE) == payload(1)
    assert again.get(OTHER, 0, SIZE) == payload(2)
    assert again.usage() == 3 * entry_size(SIZE)
    assert again.get(LAYER, 0, 0) is None
    assert again.put(LAYER, 7, b"") and again.get(LAYER, 7, 0) == b""


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "header"])
def test_damaged_entry_is_dropped_not_served(tmp_path, caplog, damage):
    c = SpanCache(tmp_path)
    c.put(LAYER, 0, payload(0))
    p = c.path(LAYER, 0, SIZE)
    raw = bytearray(p.read_bytes())
    if damage == "flip":
        raw[payload_offset(SIZE) + 1000] ^= 0x01
    elif damage == "truncate":
        del raw[-1]
    elif damage == "extend":
        raw += b"x"
    else:
        raw[0] ^= 0xFF
    p.write_bytes(bytes(raw))
    c = SpanCache(tmp_path)  # as a process that did not write it sees it (an open entry checks blocks only)
    with caplog.at_level(logging.WARNING, logger="soci_helper.store.spancache"):
        assert c.get(LAYER, 0, SIZE) is None
    assert not p.exists()
    assert len([r for r in caplog.records if "damaged" in r.getMessage()]) == 1
    assert c.put(LAYER, 0, payload(0)) and c.get(LAYER, 0, SIZE) == payload(0)


def test_ranged_reads_check_only_the_blocks_they_touch(tmp_path, caplog):
    size = 5 * BLOCK + 123
    data = payload(0, size)
    c = SpanCache(tmp_path)
    assert c.put(LAYER, 0, data)
    for off, n in [(0, 1), (BLOCK - 10, 20), (3 * BLOCK, BLOCK), (size - 5, 5), (17, size - 17), (size, 0)]:
        assert bytes(c.read(LAYER, 0, size, off, n)) == data[off:off + n]
    with pytest.raises(ValueError):
        c.read(LAYER, 0, size, size - 5, 6)
    # Damage in block 4: reads of blocks 0-3 still check out; the first read of block 4 drops the entry.
    p = c.path(LAYER, 0, size)
    with open(p, "r+b") as f:
        f.seek(payload_offset(size) + 4 * BLOCK + 7)
        f.write(b"\xff")
    assert bytes(c.read(LAYER, 0, size, 0, 4 * BLOCK)) == data[:4 * BLOCK]
    with caplog.at_level(logging.WARNING, logger="soci_helper.store.spancache"):
        assert c.read(LAYER, 0, size, 4 * BLOCK - 1, 2) is None
    assert not p.exists() and c.read(LAYER, 0, size, 0, 1) is None
    assert any("checksum mismatch in block 4" in r.getMessage() for r in caplog.records)


def test_streamed_entry_is_committed_only_when_complete(tmp_path):
    size = 3 * BLOCK + 5
    data = payload(1, size)
    c = SpanCache(tmp_path)
    w = c.writer(LAYER, 0, size)
    for k in range(0, size, 1000):  # chunks that straddle block boundaries
        w.write(data[k:k + 1000])
    assert w.commit() and c.get(LAYER, 0, size) == data
    short = c.writer(LAYER, size, size)
    short.write(data[:-1])
    assert not short.commit() and not c.has(LAYER, size, size)
    over = c.writer(LAYER, 2 * size, size)
    over.write(data + b"x")
    assert not over.commit() and not c.has(LAYER, 2 * size, size)
    assert not list(c.path(LAYER, 0, size).parent.glob(sc._TMP_PREFIX + "*"))


def test_open_entries_are_bounded_and_closed_after_eviction(tmp_path):
    c = SpanCache(tmp_path, min_free_percent=0)
    fds = len(os.listdir("/proc/self/fd"))
    for i in range(sc.OPEN_ENTRIES + 10):
        assert c.put(LAYER, i * SIZE, payload(i))
    assert len(os.listdir("/proc/self/fd")) - fds == sc.OPEN_ENTRIES
    assert c.is_open(LAYER, (sc.OPEN_ENTRIES + 9) * SIZE, SIZE) and not c.is_open(LAYER, 0, SIZE)
    c.evict(need=c.max_size)  # everything goes, and the descriptors with it
    assert len(os.listdir("/proc/self/fd")) == fds
    assert c.read(LAYER, 0, SIZE, 0, 1) is None


def test_eviction_keeps_within_max_size_oldest_first(tmp_path):
    entry = entry_size(SIZE)
    c = SpanCache(tmp_path, max_size=10 * entry, min_free_percent=0)
    base = time.time() - 1000
    for i in range(10):
        assert c.put(LAYER, i * SIZE, payload(i))
        # Distinct ages without sleeping: entry i is older than entry i+1.
        os.utime(c.path(LAYER, i * SIZE, SIZE), (base + i, base + i))
    # A hit (here by another process) makes entry 0 the most recently used.
    assert SpanCache(tmp_path, min_free_percent=0).get(LAYER, 0, SIZE) == payload(0)
    for i in range(10, 14):
        assert c.put(LAYER, i * SIZE, payload(i))
        assert c.usage() <= c.max_size
    kept = {i for i in range(14) if c.has(LAYER, i * SIZE, SIZE)}
    assert 0 in kept and {10, 11, 12, 13} <= kept
    assert not {1, 2} & kept
    # A second writer process would see the same budget: a new instance keeps it too.
    d = SpanCache(tmp_path, max_size=10 * entry, min_free_percent=0)
    for i in range(14, 30):
        assert d.put(OTHER, i * SIZE, payload(i))
    assert d.usage() <= d.max_size
    assert d.has(OTHER, 29 * SIZE, SIZE)


def test_entry_larger_than_budget_is_not_cached(tmp_path):
    c = SpanCache(tmp_path, max_size=SIZE, min_free_percent=0)
    assert not c.put(LAYER, 0, payload(0))
    assert c.usage() == 0


def test_free_space_floor_is_kept(tmp_path, caplog):
    st = os.statvfs(tmp_path)
    free_pct = 100 * st.f_bavail / st.f_blocks
    if free_pct >= 99:
        pytest.skip("the test disk is almost empty")
    c = SpanCache(tmp_path, min_free_percent=99)
    with caplog.at_level(logging.WARNING, logger="soci_helper.store.spancache"):
        assert not c.put(LAYER, 0, payload(0))
        assert not c.put(LAYER, SIZE, payload(1))
    assert c.usage() == 0
    assert len([r for r in caplog.records if "uncached" in r.getMessage()]) == 1


def test_enospc_evicts_and_retries_once_else_serves_uncached(tmp_path, monkeypatch, caplog):
    c = SpanCache(tmp_path, min_free_percent=0)
    for i in range(4):
        c.put(LAYER, i * SIZE, payload(i))
    real_write = sc.EntryWriter._write_all
    calls = {"n": 0, "fail": 1}

    def flaky(self, mv):
        calls["n"] += 1
        if calls["fail"] > 0:
            calls["fail"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, mv)

    monkeypatch.setattr(sc.EntryWriter, "_write_all", flaky)
    assert c.put(LAYER, 10 * SIZE, payload(10))  # evicted, then the retry worked
    assert calls["n"] == 2
    assert c.get(LAYER, 10 * SIZE, SIZE) == payload(10)
    assert c.usage() < 5 * entry_size(SIZE)
    calls["fail"] = 100
    with caplog.at_level(logging.WARNING, logger="soci_helper.store.spancache"):
        assert not c.put(LAYER, 11 * SIZE, payload(11))
        assert not c.put(LAYER, 12 * SIZE, payload(12))
    assert len([r for r in caplog.records if "uncached" in r.getMessage()]) == 1
    assert not list(c.path(LAYER, 0, SIZE).parent.glob(sc._TMP_PREFIX + "*"))


def test_span_lock_excludes_other_holders_and_times_out(tmp_path):
    c = SpanCache(tmp_path)
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with c.span_lock(LAYER, 0, SIZE, timeout=5):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(5)
        with pytest.raises(SpanCacheLockTimeout), c.span_lock(LAYER, 0, SIZE, timeout=0.1):
            pass
        with c.span_lock(LAYER, SIZE, SIZE, timeout=0.1):  # another span is independent
            pass
    finally:
        release.set()
        t.join(5)
    with c.span_lock(LAYER, 0, SIZE, timeout=1):
        pass


def test_bad_layer_digest_is_refused(tmp_path):
    c = SpanCache(tmp_path)
    with pytest.raises(Exception, match="digest"):
        c.get("sha256:../../etc", 0, 1)


def test_stale_lock_files_of_evicted_entries_are_removed(tmp_path):
    c = SpanCache(tmp_path, min_free_percent=0)
    for i in range(2):
        with c.span_lock(LAYER, i * SIZE, SIZE, timeout=1):
            c.put(LAYER, i * SIZE, payload(i))
    old = time.time() - 2 * sc._STALE_TMP
    locks = sorted(c.path(LAYER, 0, SIZE).parent.glob("*.lock"))
    assert len(locks) == 2
    for p in locks:
        os.utime(p, (old, old))
    c.path(LAYER, 0, SIZE).unlink()  # as eviction would
    c.scan()
    assert sorted(c.path(LAYER, 0, SIZE).parent.glob("*.lock")) == locks[1:]
