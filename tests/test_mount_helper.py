"""`mount -t fuse.soci` end to end: overlayfs over several lazy layers vs umoci, lazy fetching, dead mounts,
and bad inputs. Real registry, real mount(8), real layer servers."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.layers import real_files_layer
from support.mounts import (
    have_mount_helper,
    mount_cmd,
    mount_guard,
    mounts_under,
    server_pids,
    soci_cli,
    soci_mounts,
    tree,
    wait_servers_gone,
)
from support.registry import LocalRegistry

from soci_helper.fs import server as srv
from soci_helper.oci.layout import OCILayout
from soci_helper.sandbox.images import write_image

SMALL_SPAN = 64 << 10
SPAN_1M = 1 << 20

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="mount(8), FUSE allow_other and overlayfs need root"),
    pytest.mark.skipif(not have_mount_helper(),
                       reason="/sbin/mount.fuse.soci is missing: run `bash packaging/dev setup`"),
]


def _info(name: str, **kw: object) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = 1_690_000_000
    ti.mode = 0o644
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return path


def _layers(d: Path) -> list[Path]:
    """base (real files + a small tree), then a layer with whiteouts and an opaque dir, then a plain top."""
    d_ = tarfile.DIRTYPE
    base_tree = _tar(d / "tree.tar", [
        (_info("etc/", type=d_, mode=0o755), b""),
        (_info("etc/a"), b"a from base\n"),
        (_info("etc/b"), b"b from base\n"),
        (_info("etc/link", type=tarfile.SYMTYPE, linkname="a"), b""),
        (_info("etc/hard", type=tarfile.LNKTYPE, linkname="etc/a"), b""),
        (_info("opq/", type=d_, mode=0o755), b""),
        (_info("opq/x"), b"x\n"),
        (_info("opq/sub/y"), b"y\n"),
        (_info("keep/", type=d_, mode=0o700, uid=10, gid=20), b""),
        (_info("keep/z", mode=0o600, uid=10, gid=20), b"z\n"),
        (_info("gone-dir/", type=d_), b""),
        (_info("gone-dir/inner"), b"inner\n"),
    ])
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    real = real_files_layer(d / "real.tar", src_dirs=[stdlib / "json", stdlib / "email"])
    subprocess.run(["tar", "--concatenate", "-f", str(real), str(base_tree)], check=True)
    # Like image builders do, the upper layers carry the parent directories of what they change: an implied
    # directory would (correctly) hide the lower directory's owner and mode in overlayfs.
    mid = _tar(d / "mid.tar", [
        (_info("etc/", type=d_, mode=0o755), b""),
        (_info("etc/.wh.b"), b""),
        (_info(".wh.gone-dir"), b""),
        (_info("opq/", type=d_, mode=0o750), b""),
        (_info("opq/.wh..wh..opq"), b""),
        (_info("opq/new"), b"new in mid\n"),
        (_info("mid-only", mode=0o4755), b"#!/bin/sh\n"),
    ])
    top = _tar(d / "top.tar", [
        (_info("etc/", type=d_, mode=0o755), b""),
        (_info("etc/a", mode=0o600), b"a from top\n"),
        (_info("keep/", type=d_, mode=0o700, uid=10, gid=20), b""),
        (_info("keep/top-file"), b"top\n"),
        (_info("etc/.wh.link"), b""),
    ])
    return [real, mid, top]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("mounthelper")
    tars = _layers(d)
    layout = d / "layout"
    desc = write_image(layout, [(t, "gzip") for t in tars], "v1")
    manifest = json.loads(OCILayout(layout).read_blob(desc.digest))
    root = d / "root"
    with LocalRegistry() as reg:
        ref = reg.push_oci_layout(layout, "test/stack:v1", tag="v1")
        soci_cli(root, "create", "--plain-http", "--span-size", str(SMALL_SPAN), "--min-layer-size", "0", ref)
        cfg = d / "config.toml"
        cfg.write_text("[background_fetch]\ndisable = true\n")
        with mount_guard(d, root):
            yield {"dir": d, "root": root, "reg": reg, "ref": ref, "layout": layout, "config": cfg,
                   "layers": [x["digest"] for x in manifest["layers"]]}
    assert not mounts_under(d)
    assert not server_pids(root)


def _source(env: dict, layer: str, repo: str = "test/stack") -> str:
    return f"{env['reg'].host}/{repo}@{layer}"


def _opts(env: dict, *extra: str) -> str:
    return ",".join(["ro", "plain_http", f"root={env['root']}", f"config={env['config']}", *extra])


def _mount(env: dict, layer: str, mnt: Path, *extra: str) -> None:
    mnt.mkdir(parents=True, exist_ok=True)
    r = mount_cmd(_source(env, layer), mnt, _opts(env, *extra))
    assert r.returncode == 0, r.stderr
    assert "fuse.soci" in next(ln for ln in Path("/proc/mounts").read_text().splitlines() if f" {mnt} " in ln)


def _comparable(t: dict) -> dict:
    out = {}
    for path, rec in t.items():
        rec = {k: v for k, v in rec.items() if k not in ("ino", "nlink", "xattrs")}
        if stat.S_ISDIR(rec["mode"]):
            rec.pop("mtime_ns")  # umoci and overlayfs both touch directories while applying layers
        out[path] = rec
    return out


def test_overlay_of_lazy_layers_matches_umoci_unpack(env):
    d = env["dir"] / "overlay"
    lowers = []
    for i, layer in enumerate(env["layers"]):
        mnt = d / f"l{i}"
        _mount(env, layer, mnt)
        lowers.append(str(mnt))
    merged = d / "merged"
    merged.mkdir()
    # The leftmost lowerdir is the top layer.
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(reversed(lowers)), str(merged)],
                   check=True, capture_output=True)
    try:
        got = _comparable(tree(merged, xattrs=False))
        ref_root = env["dir"] / "umoci"
        subprocess.run(["umoci", "raw", "unpack", "--image", f"{env['layout']}:v1", str(ref_root)],
                       check=True, capture_output=True)
        want = _comparable(tree(ref_root, xattrs=False))
        assert sorted(got) == sorted(want)
        for path in want:
            assert got[path] == want[path], path
        # The points of the stacking, spelled out.
        assert not (merged / "etc/b").exists() and not (merged / "gone-dir").exists()
        assert sorted(os.listdir(merged / "opq")) == ["new"]
        assert (merged / "etc/a").read_text() == "a from top\n"
        assert (merged / "etc/hard").read_text() == "a from base\n"
        assert not os.path.lexists(merged / "etc/link")
    finally:
        subprocess.run(["umount", str(merged)], check=True)
        for mnt in lowers:
            subprocess.run(["umount", mnt], check=True)
    assert wait_servers_gone(env["root"])


def _blob_gets(env: dict, layer: str) -> int:
    return sum(1 for e in env["reg"].access_log()
               if e.method == "GET" and layer in e.path and e.status in (200, 206))


def _blob_gets_since(env: dict, layer: str, before: int) -> int:
    """Blob GETs logged since `before`: the registry logs a request just after its answer, so wait a moment
    for the first one to show."""
    deadline = time.monotonic() + 2.0
    while _blob_gets(env, layer) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return _blob_gets(env, layer) - before


@contextlib.contextmanager
def _cold_mount(env: dict, tmp_path: Path) -> Iterator[Path]:
    """The base layer mounted from a store of its own, so the span cache of other tests hides no fetch;
    unmounted after, its server gone."""
    root = tmp_path / "root"
    soci_cli(root, "create", "--plain-http", "--span-size", str(SMALL_SPAN), "--min-layer-size", "0", env["ref"])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_guard(tmp_path, root):
        before = _blob_gets(env, env["layers"][0])
        r = mount_cmd(_source(env, env["layers"][0]), mnt, f"ro,plain_http,root={root},config={env['config']}")
        assert r.returncode == 0, r.stderr
        assert _blob_gets(env, env["layers"][0]) == before, "mounting must not fetch layer data"
        yield mnt
        subprocess.run(["umount", str(mnt)], check=True)
        assert wait_servers_gone(root)


def test_reading_one_small_file_fetches_at_most_two_spans(env, tmp_path):
    layer = env["layers"][0]
    with _cold_mount(env, tmp_path) as mnt:
        before = _blob_gets(env, layer)
        small = next(p for p in sorted(mnt.rglob("*.py")) if 1000 < p.stat().st_size < 8000)
        data = small.read_bytes()
        fetched = _blob_gets_since(env, layer, before)
        assert 1 <= fetched <= 2, f"{fetched} range requests for one {len(data)}-byte file"


def test_checkpoint_windows_are_read_from_the_ztoc_file_and_checked(env, tmp_path):
    import errno

    from soci_helper.store.content import ContentStore
    from soci_helper.ztoc import codec

    with _cold_mount(env, tmp_path) as mnt:
        state = _state_of(tmp_path / "root", mnt)
        # The server keeps no window in memory: it reads each from the zTOC in the store.
        assert "windows read from the zTOC file" in srv.log_path(tmp_path / "root", state["id"]).read_text()
        files = sorted((p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size > 0),
                       key=lambda p: p.stat().st_size)
        first, victim = files[0], files[-1]
        good = first.read_bytes()
        # The zTOC file changes under the server (a bad disk): every window is damaged; what is cached still
        # reads, a span that needs a window fails with EIO rather than inflating into wrong bytes.
        ztoc_path = ContentStore(tmp_path / "root").path(state["ztoc_digest"])
        raw = bytearray(ztoc_path.read_bytes())
        z = codec.decode(bytes(raw))
        lo, hi = z.checkpoints_offset, z.checkpoints_offset + len(z.checkpoints)
        for k in range(lo + 100, hi, 4096):
            raw[k] ^= 0xFF
        with open(ztoc_path, "r+b") as f:  # in place: the server holds the file open
            f.write(raw)
        assert first.read_bytes() == good
        with pytest.raises(OSError) as e:
            victim.read_bytes()
        assert e.value.errno == errno.EIO


def test_reading_small_files_in_layer_order_fetches_nothing_past_them(env, tmp_path):
    # Consecutive small files look like one sequential stream to the span manager; read-ahead must still stop
    # at the end of each file, or every file read pulls the next spans of the layer too.
    with tarfile.open(env["dir"] / "real.tar") as tf:
        members = [m for m in tf.getmembers() if m.isreg() and 0 < m.size < 4096]
        layer_size = max(m.offset_data + m.size for m in tf.getmembers())
    # Well before the layer's end, so that read-ahead would have spans to fetch: the first stretch of at least
    # four small files within half a span.
    late = [m for m in members if layer_size // 20 < m.offset_data < layer_size // 2]
    run: list[tarfile.TarInfo] = []
    for i in range(len(late)):
        run = [m for m in late[i:] if m.offset_data + m.size - late[i].offset <= SMALL_SPAN // 2]
        if len(run) >= 4:
            break
    assert len(run) >= 4
    layer = env["layers"][0]
    with _cold_mount(env, tmp_path) as mnt:
        before = _blob_gets(env, layer)
        with tarfile.open(env["dir"] / "real.tar") as tf:
            for m in run:
                assert (mnt / m.name).read_bytes() == tf.extractfile(m).read()  # type: ignore[union-attr]
        time.sleep(0.5)  # read-ahead runs in the background: give it time to show up in the log
        # Half a span of the layer holds them all: at most the two spans it can straddle.
        fetched = _blob_gets(env, layer) - before
        assert 1 <= fetched <= 2, f"{fetched} range requests for {len(run)} files within {SMALL_SPAN // 2} bytes"


def _state_of(root: Path, mnt: Path) -> dict:
    for p in (root / "mounts").glob("*.json"):
        doc = json.loads(p.read_text())
        if doc.get("mountpoint") == str(mnt):
            return doc
    raise AssertionError(f"no state file for {mnt}")


def test_quiet_server_lets_go_of_spans_and_still_reads(env):
    mnt = env["dir"] / "resting"
    _mount(env, env["layers"][0], mnt)
    try:
        # The kernel's read-ahead on the mount is raised for sequential reads.
        dev = srv.mountinfo_device(str(mnt))
        assert Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text().strip() == str(srv.READ_AHEAD_KB)
        files = sorted(p for p in mnt.rglob("*") if p.is_file() and not p.is_symlink())
        first = {p: p.read_bytes() for p in files}
        # Two stats periods of quiet at most: the server drops what it kept in memory and trims the heap.
        deadline = time.monotonic() + 10
        while _state_of(env["root"], mnt)["memory_released"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _state_of(env["root"], mnt)["memory_released"] == 1
        # Reads after that come from the disk cache, byte for byte the same, and wake the cycle again.
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert {p: p.read_bytes() for p in files} == first
        deadline = time.monotonic() + 10
        while _state_of(env["root"], mnt)["memory_released"] < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _state_of(env["root"], mnt)["memory_released"] == 2
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


_SPAN_CHURN = """
import os, resource, sys
from concurrent.futures import ThreadPoolExecutor
from soci_helper.fs.server import keep_freed_spans
if sys.argv[1] == "tuned":
    assert keep_freed_spans()
zero = os.open("/dev/zero", os.O_RDONLY)
pool = ThreadPoolExecutor(3)
def churn(n):
    kept = []  # as the span manager: spans made in pool threads, the last two kept, older ones dropped
    for _ in range(n):
        kept.append(pool.submit(os.pread, zero, 4 << 20, 0).result())
        del kept[:-2]
churn(6)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(30)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_layer_server_reuses_freed_span_buffers():
    # With the layer server's malloc settings a new span reuses a dropped one's pages; with glibc's defaults
    # the pool threads' spans are page-faulted in afresh (about 3,000 faults for these 30 spans).
    def faults(mode: str) -> int:
        r = subprocess.run([sys.executable, "-c", _SPAN_CHURN, mode], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    tuned, default = faults("tuned"), faults("default")
    assert tuned * 10 < default, (tuned, default)


def test_killed_server_shows_dead_and_cleanup_unmounts(env):
    mnt = env["dir"] / "victim"
    _mount(env, env["layers"][1], mnt)
    listing = soci_mounts(env["root"], "--json")
    assert listing.returncode == 0, listing.stderr
    rows = [r for r in json.loads(listing.stdout) if r["mountpoint"] == str(mnt)]
    assert len(rows) == 1 and rows[0]["state"] == "alive" and rows[0]["layer_digest"] == env["layers"][1]
    os.kill(rows[0]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while rows[0]["pid"] in server_pids(env["root"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        os.listdir(mnt)
    rows = [r for r in json.loads(soci_mounts(env["root"], "--json").stdout) if r["mountpoint"] == str(mnt)]
    assert rows[0]["state"] == "dead" and "not connected" in rows[0]["why"]
    text = soci_mounts(env["root"]).stdout
    assert str(mnt) in text and "dead" in text
    r = soci_mounts(env["root"], "cleanup")
    assert r.returncode == 0, r.stderr
    assert str(mnt) in r.stdout
    assert not mounts_under(mnt)
    assert not [r for r in json.loads(soci_mounts(env["root"], "--json").stdout) if r["mountpoint"] == str(mnt)]


def _fails_cleanly(r: subprocess.CompletedProcess[str], mnt: Path, needle: str) -> None:
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("mount.fuse.soci: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not mounts_under(mnt)


def test_bad_inputs_fail_with_one_line_and_leave_no_mount(env):
    mnt = env["dir"] / "bad"
    mnt.mkdir()
    unknown = "sha256:" + "ab" * 32
    _fails_cleanly(mount_cmd(_source(env, unknown), mnt, _opts(env)), mnt, "no zTOC for layer")
    _fails_cleanly(mount_cmd(_source(env, env["layers"][0]), mnt, _opts(env, "bogus=1")), mnt,
                   "unknown mount option 'bogus=1'")
    _fails_cleanly(mount_cmd(_source(env, env["layers"][0]), mnt, _opts(env, "password=x")), mnt,
                   "credentials come from the docker config")
    # The zTOC is local but the registry is not there: the server must notice before it says "ready".
    with LocalRegistry() as other:
        dead_host = other.host
    r = mount_cmd(f"{dead_host}/test/stack@{env['layers'][0]}", mnt, _opts(env))
    _fails_cleanly(r, mnt, "cannot connect")
    assert wait_servers_gone(env["root"])
    # A malformed zTOC: the table the helper builds before the server starts fails, and says so in one line;
    # neither the builder nor the server outlives the failed mount.
    from soci_helper.store.content import ContentStore

    junk = ContentStore(env["root"]).ingest([b"\x10\x00\x00\x00" + b"\xff" * 60])
    _fails_cleanly(mount_cmd(_source(env, env["layers"][0]), mnt, _opts(env, f"ztoc={junk}")), mnt, "zTOC")
    assert wait_servers_gone(env["root"])
    assert not subprocess.run(["pgrep", "-f", "mount.fuse.soci"], capture_output=True).stdout
    # Called directly, the helper raises the same one-line error.
    from soci_helper.mount.helper import MountError, mount_layer

    with pytest.raises(MountError, match="unknown mount option"):
        mount_layer(_source(env, env["layers"][0]), mnt, "ro,nonsense", root=str(env["root"]))


def test_helper_called_directly_mounts_and_umount_ends_the_server(env):
    from soci_helper.mount.helper import mount_layer

    mnt = env["dir"] / "direct"
    mnt.mkdir()
    res = mount_layer(_source(env, env["layers"][2]), mnt, _opts(env), root=str(env["root"]))
    try:
        assert (mnt / "etc" / "a").read_text() == "a from top\n"
        assert res.pid in server_pids(env["root"])
        # The process that built the inode table is reaped after the mount is up, not left as a zombie.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{res.pid}/task/{res.pid}/children").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert Path(f"/proc/{res.pid}/task/{res.pid}/children").read_text().split() == []
    finally:
        subprocess.run([sys.executable, "-c", "import subprocess,sys; subprocess.run(['fusermount3','-u',sys.argv[1]],"
                        "check=True)", str(mnt)], check=True)
    assert wait_servers_gone(env["root"])
    assert json.loads(res.state_file.read_text())["state"] == "exited"


def _hostile_ztoc(env: dict, layer: str) -> str:
    """The layer's zTOC plus an entry that tries to leave the layer, stored under its own digest."""
    from soci_helper.index.ops import Store
    from soci_helper.store.content import ContentStore
    from soci_helper.ztoc import codec
    from soci_helper.ztoc.model import FileMetadata

    store = Store.open(env["root"])
    try:
        digest = next(e.digest for e in store.db.ztocs(layer))
    finally:
        store.close()
    content = ContentStore(env["root"])
    z = codec.decode(content.read(digest))
    z.files.append(FileMetadata(name="../escape", type="reg", uncompressed_offset=0, uncompressed_size=0))
    return content.ingest([codec.encode(z)])


@pytest.mark.parametrize("via", ["mount(8)", "library"])
def test_table_built_before_or_by_the_server_logs_its_warnings(env, via):
    # mount(8) runs the helper as a process of its own, which starts the table build before the server; the
    # daemon's in-process calls leave the build to the server. Either way the server logs what was refused.
    from soci_helper.mount.helper import mount_layer

    layer = env["layers"][0]
    mnt = env["dir"] / f"hostile-{via[:5]}"
    mnt.mkdir()
    opts = _opts(env, f"ztoc={_hostile_ztoc(env, layer)}")
    if via == "mount(8)":
        r = mount_cmd(_source(env, layer), mnt, opts)
        assert r.returncode == 0, r.stderr
    else:
        mount_layer(_source(env, layer), mnt, opts, root=str(env["root"]))
    try:
        assert not (mnt / "escape").exists() and (mnt / "etc").is_dir()
        log = srv.log_path(env["root"], _state_of(env["root"], mnt)["id"]).read_text()
        assert "refused tar entry '../escape'" in log
        assert ("table built by the mount helper's child" if via == "mount(8)" else "table built in a child") in log
        # The builder the helper started is reaped by the helper, not left behind.
        assert not subprocess.run(["pgrep", "-f", "mount.fuse.soci"], capture_output=True).stdout
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_corrupt_spans_and_outages_give_eio_then_reads_recover(env, tmp_path):
    import errno

    from support.faultproxy import FaultProxy

    layer = env["layers"][0]
    cfg = tmp_path / "config.toml"
    cfg.write_text("[background_fetch]\ndisable = true\n[blob]\nmax_span_verification_retries = 1\n"
                   "fetching_timeout_sec = 8\n[http]\nMaxRetries = 1\nMinWaitMsec = 10\nMaxWaitMsec = 50\n")
    good = tmp_path / "good"
    good.mkdir()
    proxy = FaultProxy(env["reg"].host).start()

    def cold_mount_through_proxy(name: str) -> Path:
        # A store of its own each time: nothing of the layer is cached yet.
        root, mnt = tmp_path / f"root-{name}", tmp_path / name
        mnt.mkdir()
        soci_cli(root, "create", "--plain-http", "--span-size", str(SMALL_SPAN), "--min-layer-size", "0",
                 env["ref"])
        r = mount_cmd(f"{proxy.host}/test/stack@{layer}", mnt, f"ro,plain_http,root={root},config={cfg}")
        assert r.returncode == 0, r.stderr
        return mnt

    try:
        with mount_guard(tmp_path, tmp_path):
            assert mount_cmd(_source(env, layer), good, _opts(env)).returncode == 0
            victim = next(p.relative_to(good) for p in sorted(good.rglob("*.py")) if p.stat().st_size > 20_000)

            # Every blob byte through the proxy is corrupted: the span digest check refuses it, the read fails.
            bad = cold_mount_through_proxy("corrupt")
            proxy.add("corrupt", method="GET", path="/blobs/", times=10_000)
            with pytest.raises(OSError) as e:
                (bad / victim).read_bytes()
            assert e.value.errno == errno.EIO
            assert proxy.faults[0].fired >= 1
            proxy.clear()
            assert (bad / victim).read_bytes() == (good / victim).read_bytes()

            # The registry answers nothing but 503: EIO within the configured bound, then recovery.
            down = cold_mount_through_proxy("outage")
            proxy.add("status", status=503, path="/blobs/", times=10_000)
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                (down / victim).read_bytes()
            assert e.value.errno == errno.EIO
            assert time.monotonic() - t0 < 30
            proxy.clear()
            assert (down / victim).read_bytes() == (good / victim).read_bytes()
            for m in (good, bad, down):
                subprocess.run(["umount", str(m)], check=True)
    finally:
        proxy.stop()


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")


def _unmount(mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_spare_server_becomes_the_mounts_server_and_idle_spares_go(env):
    from soci_helper.fs import server as srv
    from soci_helper.mount.helper import mount_layer
    from soci_helper.mount.spares import SparePool

    pool = SparePool(env["root"], idle_sec=2.0)
    try:
        pool.warm()
        spare = pool.take(more=True)
        nxt = pool._spares[0] if pool._spares else None
        assert spare is not None and nxt is not None
        mnt = env["dir"] / "spare"
        mnt.mkdir()
        res = mount_layer(_source(env, env["layers"][2]), mnt, _opts(env), root=str(env["root"]), spare=spare)
        try:
            assert (mnt / "etc" / "a").read_text() == "a from top\n"
            # The spare's own interpreter serves the mount, known by the mount id it was started with.
            assert res.mount_id == spare.mount_id and spare.proc.returncode == 0
            assert srv.SPARE_FLAG in _cmdline(res.pid) and srv.is_server_process(res.pid, res.mount_id)
            assert res.pid in server_pids(env["root"])
            log = res.log_file.read_text()
            # Its imports were done before the mount: it builds the table itself, no child to overlap them with.
            assert "starting (pid" in log and "table built in process" in log
        finally:
            _unmount(mnt)
        assert wait_servers_gone(env["root"])
        # take(more=True) started the next spare; nobody takes it, so it goes after idle_sec with its empty log.
        deadline = time.monotonic() + 15
        while nxt.log_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert nxt.proc.returncode is not None and not nxt.log_file.exists() and not pool._spares
    finally:
        pool.close()


def test_dead_or_unused_spares_leave_mounts_working_and_nothing_behind(env):
    from soci_helper.mount.helper import MountError, mount_layer
    from soci_helper.mount.spares import SparePool

    pool = SparePool(env["root"])
    try:
        # A spare that died before its mount: the mount starts a server of its own.
        pool.warm()
        dead = pool.take()
        assert dead is not None
        dead.proc.kill()
        dead.proc.wait()
        mnt = env["dir"] / "after-dead-spare"
        mnt.mkdir()
        res = mount_layer(_source(env, env["layers"][1]), mnt, _opts(env), root=str(env["root"]), spare=dead)
        try:
            assert res.pid in server_pids(env["root"]) and "--spare" not in _cmdline(res.pid)
        finally:
            _unmount(mnt)
        # A mount that fails before its server starts stops the spare it was given.
        pool.warm()
        unused = pool.take()
        assert unused is not None
        with pytest.raises(MountError):
            mount_layer(_source(env, env["layers"][1]), env["dir"] / "no-such-dir", _opts(env),
                        root=str(env["root"]), spare=unused)
        assert unused.proc.returncode is not None and not unused.log_file.exists()
        # So does one whose options cannot be parsed.
        pool.warm()
        refused = pool.take()
        assert refused is not None
        with pytest.raises(MountError):
            mount_layer(_source(env, env["layers"][1]), env["dir"], "ro,nonsense", root=str(env["root"]),
                        spare=refused)
        assert refused.released and refused.proc.returncode is not None and not refused.log_file.exists()
        pool.warm()
        last = pool._spares[0] if pool._spares else None
    finally:
        pool.close()
    assert last is not None and last.proc.returncode is not None
    assert wait_servers_gone(env["root"])


def test_heads_of_big_files_are_fetched_as_soon_as_the_layer_is_mounted(env, tmp_path):
    rnd = os.urandom
    entries = []
    for i in range(5):
        entries.append((_info(f"models/m{i}.bin", size=3 * SPAN_1M), rnd(3 * SPAN_1M)))
        entries.append((_info(f"models/readme{i}.txt", size=100), rnd(100)))
    tar = _tar(tmp_path / "models.tar", entries)
    layout = tmp_path / "layout"
    write_image(layout, [(tar, "gzip")], "v1")
    ref = env["reg"].push_oci_layout(layout, "test/models:v1", tag="v1")
    layer = json.loads(OCILayout(layout).read_blob(OCILayout(layout).resolve("v1").digest))["layers"][0]["digest"]
    root = tmp_path / "root"
    soci_cli(root, "create", "--plain-http", "--span-size", str(SPAN_1M), "--head-span", str(64 << 10),
             "--min-layer-size", "0", ref)
    cfg = tmp_path / "config.toml"
    # Background fetch on, but its own pass far off: what is fetched at once is the heads alone.
    cfg.write_text("[background_fetch]\ndisable = false\nsilence_period_msec = 600000\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mount_guard(tmp_path, root):
        before = _blob_gets(env, layer)
        r = mount_cmd(f"{env['reg'].host}/test/models@{layer}", mnt, f"ro,plain_http,root={root},config={cfg}")
        assert r.returncode == 0, r.stderr
        try:
            deadline = time.monotonic() + 15
            while _blob_gets(env, layer) - before < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            assert _blob_gets(env, layer) - before == 5  # one short span per big file, nothing else
            fetched = _blob_gets(env, layer)
            with tarfile.open(tar) as t:
                for i in range(5):
                    want = t.extractfile(f"models/m{i}.bin").read(4096)
                    with open(mnt / "models" / f"m{i}.bin", "rb") as f:
                        assert f.read(4096) == want
            time.sleep(0.5)
            assert _blob_gets(env, layer) == fetched  # the heads came from the span cache
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        assert wait_servers_gone(root)


def test_a_layer_missing_from_the_registry_fails_the_mount_with_or_without_a_spare(env):
    """The server checks the blob (a HEAD) while it builds the table; a missing blob is a failed mount either way."""
    from soci_helper.mount.helper import MountError, mount_layer, soci_mounts_at
    from soci_helper.mount.spares import SparePool

    pool = SparePool(env["root"])
    try:
        for use_spare in (True, False):
            if use_spare:
                pool.warm()
            spare = pool.take() if use_spare else None
            mnt = env["dir"] / f"missing-{use_spare}"
            mnt.mkdir()
            with pytest.raises(MountError, match=r"is not in .*/test/elsewhere") as err:
                mount_layer(_source(env, env["layers"][1], repo="test/elsewhere"), mnt, _opts(env),
                            root=str(env["root"]), spare=spare)
            assert str(err.value).count("\n") == 0
            assert soci_mounts_at(str(mnt)) == 0 and not any(mnt.iterdir())
    finally:
        pool.close()
    assert wait_servers_gone(env["root"])
