"""Prefetch artifacts at mount time and recorded read orders: real registry, mount(8) and layer servers."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from support.layers import real_files_layer
from support.mounts import have_mount_helper, mount_cmd, mount_guard, soci_cli, soci_mounts, wait_servers_gone
from support.registry import LocalRegistry

from soci_helper.config import Config
from soci_helper.fs import server as srv
from soci_helper.fs.spans import SpanManager
from soci_helper.index.ops import Store
from soci_helper.oci.layout import OCILayout
from soci_helper.sandbox.images import write_image
from soci_helper.store.content import ContentStore
from soci_helper.store.spancache import SpanCache
from soci_helper.ztoc import codec, prefetch
from soci_helper.ztoc.builder import build_ztoc

SPAN = 256 << 10

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and FUSE allow_other need root"),
    pytest.mark.skipif(not have_mount_helper(),
                       reason="/sbin/mount.fuse.soci is missing: run `bash packaging/dev setup`"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefetch")
    tar = real_files_layer(d / "real.tar")
    layout = d / "layout"
    desc = write_image(layout, [(tar, "gzip")], "v1")
    layer = json.loads(OCILayout(layout).read_blob(desc.digest))["layers"][0]["digest"]
    with tarfile.open(tar) as tf:
        files = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isreg()]
    with LocalRegistry() as reg:
        ref = reg.push_oci_layout(layout, "test/prefetch:v1", tag="v1")
        yield {"dir": d, "reg": reg, "ref": ref, "layer": layer, "tar": tar, "files": files}


def _store(tmp_path: Path, env: dict, record: bool = False) -> tuple[Path, Path, str]:
    """A store of its own with the layer's zTOC, and a config without background fetch."""
    root = tmp_path / "root"
    soci_cli(root, "create", "--plain-http", "--span-size", str(SPAN), "--min-layer-size", "0", env["ref"])
    store = Store.open(str(root))
    try:
        ztoc = next(e.digest for e in store.db.ztocs(env["layer"]))
    finally:
        store.close()
    cfg = tmp_path / "config.toml"
    cfg.write_text("[background_fetch]\ndisable = true\n" + ("[fuse]\nrecord_reads = true\n" if record else ""))
    return root, cfg, ztoc


def _gets(env: dict) -> int:
    return sum(1 for e in env["reg"].access_log()
               if e.method == "GET" and env["layer"] in e.path and e.status in (200, 206))


def _cached(root: Path, ztoc_digest: str, layer: str) -> set[int]:
    """Spans of the layer in the store's on-disk span cache, as any layer server would find them."""
    ztoc = codec.decode(ContentStore(root).read(ztoc_digest))

    def no_fetch(off: int, n: int) -> bytes:
        raise AssertionError("only the cache is looked at")

    with SpanManager(ztoc, layer, no_fetch, SpanCache(root), Config()) as m:
        return {s for s in range(m.num_spans) if m.is_cached(s)}


def _mount(env: dict, root: Path, cfg: Path, mnt: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    opts = ",".join(["ro", "plain_http", f"root={root}", f"config={cfg}", *extra])
    return mount_cmd(f"{env['reg'].host}/test/prefetch@{env['layer']}", mnt, opts)


def _server_log(root: Path) -> str:
    return "".join(p.read_text() for p in srv.mounts_dir(root).glob("*.log"))


def test_a_prefetch_artifacts_spans_are_fetched_at_mount_and_reads_find_them(env, tmp_path):
    root, cfg, ztoc = _store(tmp_path, env)
    ztoc_obj = codec.decode(ContentStore(root).read(ztoc))
    with SpanManager(ztoc_obj, env["layer"], lambda o, n: b"", SpanCache(root), Config()) as m:
        # A small file inside one span: reading it whole reads nothing past its end.
        name, sid = next((f[0], m.spans_of(f[1], 1)[0]) for f in env["files"][len(env["files"]) // 4:]
                         if 100 < f[2] < 8000 and len(m.spans_of(f[1], f[2])) == 1 and m.spans_of(f[1], 1)[0] > 2)
        last = m.num_spans - 1
    order = [sid - 2, sid - 1, last, sid]  # sid-2 and sid-1 in one request
    art = ContentStore(root).write(prefetch.encode(prefetch.from_order(order)))
    mnt = tmp_path / "mnt"
    with mount_guard(tmp_path, root):
        before = _gets(env)
        r = _mount(env, root, cfg, mnt, f"prefetch={art}")
        assert r.returncode == 0, r.stderr
        try:
            deadline = time.monotonic() + 20
            while _cached(root, ztoc, env["layer"]) != set(order) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _cached(root, ztoc, env["layer"]) == set(order)
            time.sleep(0.3)  # the registry logs a request just after answering it
            assert _gets(env) - before == 3  # nothing unlisted
            with tarfile.open(env["tar"]) as tf:
                want = tf.extractfile(name).read()  # type: ignore[union-attr]
            assert (mnt / name).read_bytes() == want
            time.sleep(0.3)
            assert _gets(env) - before == 3  # the file came from the span cache
            assert "prefetched 4 spans" in _server_log(root)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert wait_servers_gone(root)


@pytest.mark.parametrize("kind", ["missing", "bad"])
def test_a_missing_or_bad_artifact_costs_the_prefetch_not_the_mount(env, tmp_path, kind):
    root, cfg, _ = _store(tmp_path, env)
    mnt = tmp_path / "mnt"
    if kind == "missing":  # e.g. removed with its index while the layer stayed mounted, then mounted again
        art = "sha256:" + "ab" * 32
    else:  # JSON that reaches past the layer's last span
        art = ContentStore(root).write(b'{"version":"1.0","prefetch_spans":[{"start_span":0,"end_span":99999}]}')
    with mount_guard(tmp_path, root):
        before = _gets(env)
        r = _mount(env, root, cfg, mnt, f"prefetch={art}")
        assert r.returncode == 0, r.stderr
        try:
            time.sleep(1.0)
            assert _gets(env) == before
            assert f"prefetch artifact {art} not used" in _server_log(root)
            name = next(f[0] for f in env["files"] if f[2] > 100)
            with tarfile.open(env["tar"]) as tf:
                assert (mnt / name).read_bytes() == tf.extractfile(name).read()  # type: ignore[union-attr]
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert wait_servers_gone(root)


def test_recorded_reads_give_a_load_order_in_first_read_order(env, tmp_path):
    root, cfg, _ = _store(tmp_path, env, record=True)
    mnt = tmp_path / "mnt"
    # Three files smaller than the read-ahead, far apart in the layer, read out of layer order.
    small = [f for f in env["files"] if 2000 < f[2] < 60000]
    picks = [small[len(small) * 3 // 4], small[len(small) // 8], small[len(small) // 2]]
    with mount_guard(tmp_path, root):
        r = _mount(env, root, cfg, mnt)
        assert r.returncode == 0, r.stderr
        try:
            for name, _, size in picks:
                assert len((mnt / name).read_bytes()) == size
            (mnt / picks[0][0]).read_bytes()  # read again: adds nothing
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert wait_servers_gone(root)
    out = tmp_path / "order.json"
    r = soci_mounts(root, "reads", "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc == [{"path": "/" + name, "offset": 0, "length": size} for name, _, size in picks]


def test_reads_without_records_say_so(tmp_path):
    r = soci_mounts(tmp_path / "root", "reads")
    assert r.returncode == 1
    assert "no read records" in r.stderr and "record_reads" in r.stderr


def test_with_a_prefetch_artifact_the_heads_of_big_files_are_left_to_it(tmp_path):
    """Heads are fetched ahead for a mount without an artifact; with one, only its spans are."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(4):
            data = os.urandom(3 << 20)
            ti = tarfile.TarInfo(f"models/m{i}.bin")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    blob = gzip.compress(buf.getvalue(), compresslevel=1)
    ztoc = build_ztoc(iter([blob]), "gzip", 1 << 20, "test", head_span=64 << 10)
    layer = "sha256:" + hashlib.sha256(blob).hexdigest()
    cfg = Config()
    cfg.background_fetch.silence_period_msec = 600_000  # background fetch proper never starts here

    def fetched_after(prefetch_order: list[int] | None, cache: Path) -> tuple[set[int], set[int]]:
        got: set[int] = set()

        def fetch(off: int, n: int) -> bytes:
            got.add(off)
            return blob[off:off + n]

        with SpanManager(ztoc, layer, fetch, SpanCache(cache), cfg) as m:
            heads = m.head_spans()
            assert len(heads) == 4
            if prefetch_order is not None:
                t = m.start_prefetch(prefetch_order)
                assert t is not None
                t.join(20)
            m.start_background_fetch()
            time.sleep(1.0)
            return {s for s in range(m.num_spans) if m._c_start[s] in got}, set(heads)

    fetched, heads = fetched_after(None, tmp_path / "a")
    assert fetched == heads
    fetched, heads = fetched_after([0], tmp_path / "b")
    assert fetched == {0}


def test_a_read_record_merges_continuations_and_stops_at_its_cap(monkeypatch):
    from soci_helper.fs import record
    from soci_helper.fs.inodes import InodeTable

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in ("a/one", "a/b/two", "three"):
            data = os.urandom(50_000)
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    table = InodeTable(build_ztoc(iter([gzip.compress(buf.getvalue())]), "gzip", 1 << 20, "test"))
    ino = {p: table.resolve(p).ino for p in ("a/one", "a/b/two", "three")}  # type: ignore[union-attr]
    monkeypatch.setattr(record, "MAX_SEGMENTS", 3)
    rec = record.ReadRecorder()
    rec.add(ino["a/b/two"], 0, 4096)
    rec.add(ino["a/b/two"], 4096, 8192)  # continues the segment
    rec.add(ino["a/one"], 8192, 100)
    rec.add(ino["a/b/two"], 1000, 10)  # inside what was read
    rec.add(ino["three"], 0, 10)
    rec.add(ino["a/one"], 40_000, 10)  # past the cap
    assert rec.full
    reads = [(r["path"], r["offset"], r["length"]) for r in rec.document(table)["reads"]]
    assert reads == [("/a/b/two", 0, 12288), ("/a/one", 8192, 100), ("/three", 0, 10)]
