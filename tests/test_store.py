"""Content store and artifacts database: atomic verified writes, locks, concurrency, disk full."""

from __future__ import annotations

import multiprocessing
import os
import subprocess

import pytest

from soci_helper import digest as dg
from soci_helper.errors import DigestError, NotFound, StoreError
from soci_helper.store.artifacts import TYPE_INDEX, TYPE_ZTOC, ArtifactEntry, ArtifactsDB
from soci_helper.store.content import ContentStore


def test_write_read_layout(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(100_000)
    d = store.write(data)
    assert d == dg.of_bytes(data)
    assert store.path(d) == tmp_path / "content" / "blobs" / "sha256" / d[7:]
    assert store.read(d) == data
    assert (tmp_path / "content" / "oci-layout").read_text() == '{"imageLayoutVersion": "1.0.0"}'
    assert list(store.digests()) == [d]
    # Nothing is left in the ingest area once a write is done.
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


def test_mismatch_leaves_nothing(tmp_path):
    store = ContentStore(tmp_path)
    wrong = dg.of_bytes(b"other")
    with pytest.raises(DigestError, match="mismatch"):
        store.write(b"data", wrong)
    assert not store.has(wrong)
    assert not store.has(dg.of_bytes(b"data"))
    assert list((tmp_path / "content" / "ingest").iterdir()) == []


def test_ingest_of_a_stream_that_verifies_itself(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(300_000)
    d = dg.of_bytes(data)

    def stream(fail: bool):
        yield data[:100_000]
        yield data[100_000:]
        if fail:  # as a registry client's blob stream does after its last chunk
            raise DigestError("blob digest mismatch")

    with pytest.raises(DigestError):
        store.ingest(stream(True), d, verified=True)
    assert not store.has(d)
    assert list((tmp_path / "content" / "ingest").iterdir()) == []
    assert store.ingest(stream(False), d, verified=True) == d
    assert store.read(d) == data  # read() still checks the digest
    with pytest.raises(ValueError):
        store.ingest([b"x"], verified=True)


def test_damaged_blob_is_reported(tmp_path):
    store = ContentStore(tmp_path)
    d = store.write(b"hello world")
    store.path(d).write_bytes(b"hello w0rld")
    with pytest.raises(StoreError, match="damaged"):
        store.read(d)
    with pytest.raises(NotFound):
        store.read(dg.of_bytes(b"absent"))


def _writer(root: str, seed: int, q) -> None:  # type: ignore[no-untyped-def]
    store = ContentStore(root)
    blob = bytes([seed % 7]) * (1 << 20)
    digests = []
    for i in range(20):
        digests.append(store.write(blob + i.to_bytes(2, "big")))
    db = ArtifactsDB(store.root / "artifacts.db")
    for d in digests:
        db.put(ArtifactEntry(digest=d, type=TYPE_ZTOC, size=len(blob) + 2, original_digest=d))
    q.put(digests)


def test_concurrent_writers_share_one_consistent_store(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 1, q)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert all(r == results[0] for r in results)
    store = ContentStore(tmp_path)
    for d in results[0]:
        store.read(d)  # verifies the digest: no torn blob
    db = ArtifactsDB(tmp_path / "artifacts.db")
    assert sorted(e.digest for e in db.ztocs()) == sorted(results[0])


def test_artifacts_db_queries(tmp_path):
    db = ArtifactsDB(tmp_path / "a.db")
    z = "sha256:" + "1" * 64
    layer = "sha256:" + "2" * 64
    idx = "sha256:" + "3" * 64
    img = "sha256:" + "4" * 64
    db.put(ArtifactEntry(digest=z, type=TYPE_ZTOC, size=10, original_digest=layer, span_size=4 << 20))
    db.put(ArtifactEntry(digest=idx, type=TYPE_INDEX, size=20, original_digest=img, platform="linux/amd64"))
    assert db.find_ztoc(layer, 4 << 20).digest == z
    assert db.find_ztoc(layer, 1 << 20) is None
    assert [e.digest for e in db.indexes(img)] == [idx]
    assert db.get(idx).platform == "linux/amd64"
    assert db.remove(z) and db.get(z) is None


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_clear_error_and_leaves_no_partial_blob(tiny_fs):
    store = ContentStore(tiny_fs)
    with pytest.raises(StoreError, match="disk full"):
        store.write(os.urandom(4 << 20))
    assert list(store.digests()) == []
    assert list((tiny_fs / "content" / "ingest").iterdir()) == []
    # The store still works for what fits.
    d = store.write(b"small")
    assert store.read(d) == b"small"


def test_artifacts_db_of_an_older_version_gains_the_head_span_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    old = sqlite3.connect(str(path))
    old.executescript(
        "CREATE TABLE artifacts (digest TEXT PRIMARY KEY, type TEXT NOT NULL, size INTEGER NOT NULL, "
        "original_digest TEXT NOT NULL, image_digest TEXT NOT NULL DEFAULT '', image_ref TEXT NOT NULL DEFAULT '', "
        "platform TEXT NOT NULL DEFAULT '', span_size INTEGER NOT NULL DEFAULT 0, media_type TEXT NOT NULL DEFAULT '', "
        "artifact_type TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL);"
        "INSERT INTO artifacts (digest, type, size, original_digest, span_size, created_at) "
        "VALUES ('sha256:" + "a" * 64 + "', 'ztoc', 10, 'sha256:" + "b" * 64 + "', 4194304, 'x');"
    )
    old.close()
    db = ArtifactsDB(path)
    try:
        # The old row is upstream's layout; a head-span build of the same layer is another entry.
        assert db.find_ztoc("sha256:" + "b" * 64, 4194304).digest == "sha256:" + "a" * 64
        assert db.find_ztoc("sha256:" + "b" * 64, 4194304, 65536) is None
        db.put(ArtifactEntry("sha256:" + "c" * 64, TYPE_ZTOC, 11, "sha256:" + "b" * 64, span_size=4194304,
                             head_span=65536))
        assert db.find_ztoc("sha256:" + "b" * 64, 4194304, 65536).digest == "sha256:" + "c" * 64
    finally:
        db.close()
    ArtifactsDB(path).close()  # opening a migrated database again is a no-op


def test_write_atomically_leaves_the_old_file_whole_when_the_write_fails(tmp_path, monkeypatch):
    from soci_helper.store import atomic

    target = tmp_path / "state.json"
    atomic.write_atomically(target, "old\n", mode=0o600)
    assert target.read_text() == "old\n" and (target.stat().st_mode & 0o777) == 0o600

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", no_space)
    with pytest.raises(OSError):
        atomic.write_atomically(target, b"new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary file left behind
