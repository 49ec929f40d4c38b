"""The layer filesystem: the inode table from hostile zTOCs, and real mounts compared with GNU tar extraction."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from support.layers import edge_case_layer, real_files_layer
from support.mounts import mount_guard, server_pids, soci_cli, tree, wait_servers_gone
from support.registry import LocalRegistry

from soci_helper.fs.inodes import OPAQUE_XATTR, InodeTable
from soci_helper.mount.helper import mount_layer
from soci_helper.sandbox.images import write_image
from soci_helper.ztoc import codec
from soci_helper.ztoc.model import CompressionAlgorithm, FileMetadata, Ztoc, parse_mod_time

SPAN = 1 << 20


def _ztoc(files: list[FileMetadata], size: int = 1 << 20) -> Ztoc:
    return Ztoc(build_tool_identifier="test", compressed_archive_size=size, uncompressed_archive_size=size,
                files=files, compression_algorithm=CompressionAlgorithm.GZIP, max_span_id=0, span_digests=[],
                checkpoints=b"")


def _f(name: str, type_: str = "reg", off: int = 512, size: int = 0, **kw: object) -> FileMetadata:
    return FileMetadata(name=name, type=type_, uncompressed_offset=off, uncompressed_size=size, **kw)  # type: ignore[arg-type]


# --- the inode table --------------------------------------------------------------------


def test_hostile_names_are_refused_or_sanitized_and_logged():
    warnings: list[str] = []
    files = [
        _f("../escape", size=1),
        _f("a/../../etc/passwd", size=1),
        _f("ok/../x"),
        _f("nul\0name"),
        _f("", size=1),
        _f("/abs/file", size=3, mode=0o600),
        _f("past/end", off=(1 << 20) - 10, size=11),
        _f("neg", off=-1, size=1),
        _f("fine", size=5, mode=0o644),
        _f("link-to-missing", "hardlink", linkname="no/such"),
        _f("link-to-dir", "hardlink", linkname="abs"),
        _f("fine/under-a-file", size=1),
        _f("weird", "socket"),
    ]
    t = InodeTable(_ztoc(files), on_warning=warnings.append)
    assert sorted(n for n, _ in t.listing(1)) == [b"abs", b"fine"]
    assert t.resolve("abs/file").size == 3 and t.resolve("abs/file").mode == stat.S_IFREG | 0o600
    # One line per refused or sanitized entry.
    assert len(warnings) == len(files) - 1 == t.warnings
    assert all("\n" not in w for w in warnings)
    assert any("'..'" in w for w in warnings) and any("past the archive end" in w for w in warnings)
    assert any("no/such" in w and "missing" in w for w in warnings)
    assert t.resolve("etc") is None and t.resolve("escape") is None


def test_tar_semantics_duplicates_hardlinks_implied_dirs_whiteouts():
    files = [
        _f("./", "dir", mode=0o700, mod_time="2023-11-14T22:13:20Z"),
        _f("d/sub/file", size=4, mode=0o4755, uid=7, gid=8, mod_time="2023-11-14T22:13:20.5Z"),
        _f("d/sub/hard", "hardlink", linkname="d/sub/file"),
        _f("d/hard2", "hardlink", linkname="./d/sub/file"),
        _f("d/", "dir", mode=0o1777, mod_time="1968-10-10T00:00:00Z"),
        _f("dup", size=1),
        _f("dup", size=2, off=1024),
        _f("d/sub/hard", size=9),  # replacing one name of a hardlink group drops one link
        _f("d/.wh.gone", mode=0o600),
        _f("d/opq/.wh..wh..opq"),
        _f("d/opq/", "dir", mode=0o755),
        _f("s", "symlink", linkname="/etc/passwd"),
        _f("c", "char", devmajor=4, devminor=64),
        _f("b", "block", devmajor=259, devminor=70000),
        _f("p", "fifo", mode=0o644),
        _f("x", size=1, pax={"SCHILY.xattr.user.a": b"\x00\xff", "mtime": b"1.5"}),
        _f("t", size=0, mod_time=""),
    ]
    t = InodeTable(_ztoc(files))
    assert t.warnings == 0
    root = t.root
    assert root.mode == stat.S_IFDIR | 0o700 and root.mtime_ns == 1_700_000_000 * 10**9
    f = t.resolve("d/sub/file")
    assert f.mode == stat.S_IFREG | 0o4755 and (f.uid, f.gid) == (7, 8) and f.mtime_ns == 1_700_000_000_500_000_000
    assert t.resolve("d/hard2") is f and f.nlink == 2 and t.resolve("d/sub/hard").size == 9
    d = t.resolve("d")
    assert d.mode == stat.S_IFDIR | 0o1777 and d.mtime_ns < 0 and t.resolve("d/sub") is not None
    assert d.nlink == 4  # ".", its entry, and the ".." of sub/ and opq/
    assert t.resolve("dup").size == 2 and t.resolve("dup").offset == 1024
    gone = t.resolve("d/gone")
    assert stat.S_ISCHR(gone.mode) and gone.rdev == 0 and t.resolve("d/.wh.gone") is None
    opq = t.resolve("d/opq")
    assert opq.xattrs == {OPAQUE_XATTR: b"y"} and t.listing(opq.ino) == []
    assert t.resolve("s").target == b"/etc/passwd" and t.resolve("s").size == 11
    assert t.resolve("c").rdev == os.makedev(4, 64) and t.resolve("b").rdev == os.makedev(259, 70000)
    assert stat.S_ISFIFO(t.resolve("p").mode)
    assert t.resolve("x").xattrs == {b"user.a": b"\x00\xff"} and t.resolve("t").mtime_ns == 0
    names = [n for n, _ in t.listing(1)]
    assert names == [b"d", b"dup", b"s", b"c", b"b", b"p", b"x", b"t"]


def test_mod_times_sharing_a_minute_parse_like_the_slow_path():
    # The table caches a minute and adds the seconds; anything unusual must still go the full way.
    times = ["2023-11-14T22:13:20Z", "2023-11-14T22:13:21Z", "2023-11-14T22:13:59Z", "2023-11-14T22:13:05.25Z",
             "2023-11-14T22:14:00Z", "1969-12-31T23:59:59Z", "2023-11-14T22:13:60Z", "2023-11-14T23:13:21+01:00"]
    files = [_f(f"f{i}", size=0, mod_time=t) for i, t in enumerate(times)]
    z = _ztoc(files)
    z.compression_algorithm, z.span_digests = CompressionAlgorithm.UNCOMPRESSED, ["sha256:" + "0" * 64]
    table, _ = InodeTable.from_bytes(codec.encode(z))
    for i, t in enumerate(times):
        try:
            secs, nanos = parse_mod_time(t)
        except ValueError:  # a leap second: refused by the full parser too, shown as 0 with a warning
            secs, nanos = 0, 0
        assert table.resolve(f"f{i}").mtime_ns == secs * 10**9 + nanos, t
    assert table.warnings == 1


def test_mod_times_are_parsed_when_first_asked_for_and_once():
    times = ["2023-11-14T22:13:20Z", "2023-02-30T10:00:00Z", "9999-12-31T23:59:59Z", "2023-11-14T22:13:20Z"]
    warnings: list[str] = []
    table = InodeTable(_ztoc([_f(f"f{i}", size=0, mod_time=t) for i, t in enumerate(times)]), warnings.append)
    assert table.warnings == 0  # nothing parsed by the build
    bad = table.resolve("f1")
    assert bad.mtime_ns == 0 and table.warnings == 1 and "2023-02-30" in warnings[0]
    assert table.get(bad.ino).mtime_ns == table.mtime_ns(bad.ino) == 0 and table.warnings == 1  # warned once
    assert table.resolve("f2").mtime_ns == 2**63 - 1  # past what the kernel's nanoseconds hold: clamped
    assert table.resolve("f0").mtime_ns == table.resolve("f3").mtime_ns == 1_700_000_000 * 10**9
    assert table.mtime_id[table.resolve("f0").ino] == table.mtime_id[table.resolve("f3").ino]  # one raw copy


# --- real mounts --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("mounting FUSE with allow_other and extracting devices need root")
    d = tmp_path_factory.mktemp("layerfs")
    edge = edge_case_layer(d / "edge.tar")
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    real = real_files_layer(d / "real.tar", src_dirs=[stdlib / "json", stdlib / "email", stdlib / "asyncio"])
    layout = d / "layout"
    desc = write_image(layout, [(edge, "gzip"), (real, "pigz")], "v1")
    import json

    from soci_helper.oci.layout import OCILayout

    manifest = json.loads(OCILayout(layout).read_blob(desc.digest))
    root = d / "root"
    with LocalRegistry() as reg:
        ref = reg.push_oci_layout(layout, "test/layerfs:v1", tag="v1")
        soci_cli(root, "create", "--plain-http", "--span-size", str(SPAN), "--min-layer-size", "0", ref)
        with mount_guard(d, root):
            yield {"dir": d, "root": root, "reg": reg, "ref": ref, "edge": edge, "real": real,
                   "layers": [x["digest"] for x in manifest["layers"]]}
    assert not server_pids(root)


def _extract(tar: Path, dest: Path) -> None:
    dest.mkdir()
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(tar), "-C", str(dest)],
                   check=True, capture_output=True)


def _expected(tar: Path, dest: Path) -> dict[str, dict[str, object]]:
    """GNU tar's extraction, translated the way a lower layer shows whiteouts to overlayfs."""
    _extract(tar, dest)
    want = tree(dest)
    out: dict[str, dict[str, object]] = {}
    for path, rec in want.items():
        head, _, name = path.rpartition("/")
        if name == ".wh..wh..opq":
            parent = out.setdefault(head, want[head]) if head else None
            if parent is not None:
                parent["xattrs"] = {**parent["xattrs"], "trusted.overlay.opaque": b"y"}  # type: ignore[dict-item]
            continue
        if name.startswith(".wh."):
            rec = {**rec, "mode": stat.S_IFCHR | (rec["mode"] & 0o7777), "rdev": (0, 0)}  # type: ignore[operator]
            for k in ("size", "sha256"):
                rec.pop(k, None)
            path = (head + "/" if head else "") + name[len(".wh."):]
        out.setdefault(path, rec)
    return out


def _dirs_with_stable_mtime(tar: Path) -> set[str]:
    """Directories with an entry whose contents all follow it directly: GNU tar restores their mtime last.

    A directory written into again after tar moved on (a later concatenated part adds a child) keeps the
    extraction time in tar's result, while the layer rightly shows the recorded mtime.
    """
    with tarfile.open(tar) as t:
        names = [(m.name.rstrip("/"), m.isdir()) for m in t.getmembers()]
    stable = set()
    for i, (d, is_dir) in enumerate(names):
        if not is_dir:
            continue
        inside = [j for j, (n, _) in enumerate(names) if j > i and n.startswith(d + "/")]
        if not inside or inside == list(range(i + 1, i + 1 + len(inside))):
            stable.add(d)
    return stable


def _compare(got: dict, want: dict, dated_dirs: set[str]) -> None:
    assert sorted(got) == sorted(want)
    for path in want:
        g, w = dict(got[path]), dict(want[path])
        is_dir = stat.S_ISDIR(w["mode"])
        for rec in (g, w):
            rec.pop("ino")
            if is_dir:
                rec.pop("nlink")  # subdirectory counts: the layer's tree vs the extraction's filesystem
                if path not in dated_dirs:
                    rec.pop("mtime_ns")  # implied or re-entered directories: see _dirs_with_stable_mtime
        assert g == w, path


def _hardlink_groups(t: dict) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for path, rec in t.items():
        if not stat.S_ISDIR(rec["mode"]):
            groups.setdefault(rec["ino"], set()).add(path)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


@pytest.mark.parametrize("which", [0, 1], ids=["edge-case-layer", "real-files-layer"])
def test_mounted_layer_matches_gnu_tar_extraction(env, tmp_path, which):
    layer = env["layers"][which]
    tar = env["edge"] if which == 0 else env["real"]
    mnt = env["dir"] / f"mnt-{which}"
    mnt.mkdir()
    source = f"{env['reg'].host}/test/layerfs@{layer}"
    res = mount_layer(source, mnt, "ro,plain_http", root=str(env["root"]))
    try:
        mounts = Path("/proc/mounts").read_text()
        assert f"{source} {mnt} fuse.soci ro," in mounts
        got = tree(mnt)
        want = _expected(tar, tmp_path / "x")
        _compare(got, want, _dirs_with_stable_mtime(tar))
        assert _hardlink_groups(got) == _hardlink_groups(want)
        if which == 0:
            assert any(len(g) == 3 for g in _hardlink_groups(got))
            assert got["whiteout/opaque"]["xattrs"] == {"trusted.overlay.opaque": b"y"}
        # Read-only, whatever the permission bits say.
        some_file = next(p for p, r in got.items() if stat.S_ISREG(r["mode"]))
        with pytest.raises(OSError) as exc, open(mnt / some_file, "r+b"):
            pass
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            (mnt / "new-file").write_bytes(b"x")
        assert exc.value.errno == errno.EROFS
        assert os.statvfs(mnt).f_files >= len({r["ino"] for r in got.values()})
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert f" {mnt} " not in Path("/proc/mounts").read_text()
    assert wait_servers_gone(env["root"]), "umount must end the layer server"
    doc = __import__("json").loads(res.state_file.read_text())
    assert doc["state"] == "exited" and doc["bytes_served"] > 0
