"""The snapshotter's own layer unpack: overlay whiteouts, metadata, compressions, and hostile tars refused."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from soci_helper.snapshotter.unpack import OPAQUE_XATTR, UnpackError, unpack_blob, unpack_stream

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="owners, devices and trusted xattrs need root")


def _tar(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in entries:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _i(name: str, type: bytes = tarfile.REGTYPE, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = 0o644 if type != tarfile.DIRTYPE else 0o755
    info.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def _files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(dest, outside): a sentinel directory next to the destination must stay untouched."""
    dest, outside = tmp_path / "dest", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (outside / "victim").write_text("original\n")
    return dest, outside


def _untouched(outside: Path) -> None:
    assert _files_under(outside) == ["victim"]
    assert (outside / "victim").read_text() == "original\n"


@ROOT_ONLY
def test_layer_with_whiteouts_metadata_and_links(tmp_path: Path) -> None:
    data = _tar([
        (_i("./", tarfile.DIRTYPE), b""),
        (_i("etc/", tarfile.DIRTYPE, mode=0o750, uid=7, gid=8, mtime=1_600_000_000), b""),
        (_i("etc/conf", uid=1000, gid=1001, mode=0o4755,
            pax_headers={"SCHILY.xattr.user.note": "hi", "SCHILY.xattr.trusted.overlay.redirect": "/x"}), b"c\n"),
        (_i("etc/hard", tarfile.LNKTYPE, linkname="etc/conf"), b""),
        (_i("etc/sym", tarfile.SYMTYPE, linkname="/etc/conf", uid=5, gid=6), b""),
        (_i("etc/.wh.removed"), b""),
        (_i("opq/.wh..wh..opq"), b""),
        (_i("opq/new"), b"n\n"),
        (_i("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), b""),
        (_i("run/fifo", tarfile.FIFOTYPE, mode=0o600), b""),
        (_i("ro/", tarfile.DIRTYPE, mode=0o500), b""),
        (_i("ro/inside"), b"still written\n"),
    ])
    dest = tmp_path / "d"
    dest.mkdir()
    stats = unpack_stream(io.BytesIO(data), dest)
    assert stats.diff_id == _sha(data) and stats.whiteouts == 1 and stats.opaque_dirs == 1
    st = (dest / "etc/conf").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1001, 0o4755)
    assert st.st_mtime_ns == 1_700_000_000 * 10**9 and st.st_nlink == 2
    assert (dest / "etc/hard").stat().st_ino == st.st_ino
    assert os.getxattr(dest / "etc/conf", "user.note") == b"hi"
    assert "trusted.overlay.redirect" not in os.listxattr(dest / "etc/conf")  # never taken from a tar
    assert os.readlink(dest / "etc/sym") == "/etc/conf"
    assert os.lstat(dest / "etc/sym").st_uid == 5
    wo = os.lstat(dest / "etc/removed")
    assert stat.S_ISCHR(wo.st_mode) and wo.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "opq", OPAQUE_XATTR) == b"y"
    assert (dest / "opq/new").read_text() == "n\n" and not (dest / "opq/.wh..wh..opq").exists()
    assert os.lstat(dest / "dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(dest / "run/fifo").st_mode)
    d = (dest / "etc").stat()
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_mtime_ns) == (0o750, 7, 1_600_000_000 * 10**9)
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o500 and (dest / "ro/inside").exists()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compressions_and_diff_id(tmp_path: Path, compression: str) -> None:
    if compression == "zstd" and not shutil.which("zstd"):
        pytest.skip("zstd command missing")
    data = _tar([(_i("a/b.txt"), b"hello " * 1000)], fmt=tarfile.GNU_FORMAT)
    blob = tmp_path / "blob"
    if compression == "gzip":
        blob.write_bytes(gzip.compress(data))
    elif compression == "zstd":
        blob.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True).stdout)
    else:
        blob.write_bytes(data)
    dest = tmp_path / "d"
    dest.mkdir()
    unpack_blob(blob, dest, expected_diff_id=_sha(data))  # compression sniffed
    assert (dest / "a/b.txt").read_bytes() == b"hello " * 1000
    other = tmp_path / "d2"
    other.mkdir()
    with pytest.raises(UnpackError, match="diffID"):
        unpack_blob(blob, other, expected_diff_id=_sha(b"something else"))


def test_multimember_gzip(tmp_path: Path) -> None:
    data = _tar([(_i("x"), os.urandom(3000)), (_i("y"), b"y")])
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(data[:1024]) + gzip.compress(data[1024:]))
    dest = tmp_path / "d"
    dest.mkdir()
    assert unpack_blob(blob, dest, compression="gzip").diff_id == _sha(data)
    assert (dest / "y").read_bytes() == b"y"


HOSTILE = {
    "dotdot": ([(_i("../outside/victim"), b"pwned\n")], "'..'"),
    "dotdot-deep": ([(_i("a/b/../../../outside/victim"), b"pwned\n")], "'..'"),
    "absolute": ([(_i("/abs-victim-of-soci-unpack"), b"pwned\n")], "absolute"),
    "symlink-then-write": ([(_i("esc", tarfile.SYMTYPE, linkname="../outside"), b""),
                            (_i("esc/victim"), b"pwned\n")], "symlink"),
    "symlink-dir-then-mkdir": ([(_i("esc", tarfile.SYMTYPE, linkname="../outside"), b""),
                                (_i("esc/newdir/", tarfile.DIRTYPE), b"")], "symlink"),
    "symlink-then-whiteout": ([(_i("esc", tarfile.SYMTYPE, linkname="../outside"), b""),
                               (_i("esc/.wh.victim"), b"")], "symlink"),
    "symlink-then-opaque": ([(_i("esc", tarfile.SYMTYPE, linkname="../outside"), b""),
                             (_i("esc/.wh..wh..opq"), b"")], "symlink"),
    "hardlink-dotdot": ([(_i("h", tarfile.LNKTYPE, linkname="../outside/victim"), b"")], "escapes"),
    "hardlink-absolute": ([(_i("h", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")], "escapes"),
    "hardlink-through-symlink": ([(_i("esc", tarfile.SYMTYPE, linkname="../outside"), b""),
                                  (_i("h", tarfile.LNKTYPE, linkname="esc/victim"), b"")], "symlink"),
    "hardlink-missing": ([(_i("h", tarfile.LNKTYPE, linkname="nowhere"), b"")], "not in this layer"),
    "fake-whiteout-device": ([(_i("etc/passwd", tarfile.CHRTYPE, devmajor=0, devminor=0), b"")], "whiteout"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tars_are_refused(box: tuple[Path, Path], case: str) -> None:
    dest, outside = box
    entries, why = HOSTILE[case]
    with pytest.raises(UnpackError, match=why):
        unpack_stream(io.BytesIO(_tar(entries)), dest)
    _untouched(outside)
    assert not Path("/abs-victim-of-soci-unpack").exists()
    # Nothing was created through the link: the only thing below dest is what the tar made legitimately.
    assert all(not p.is_symlink() or os.readlink(p) == "../outside" for p in dest.rglob("*"))


def test_devices_refused_when_not_allowed(box: tuple[Path, Path]) -> None:
    dest, outside = box
    data = _tar([(_i("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), b"")])
    with pytest.raises(UnpackError, match="device files are refused"):
        unpack_stream(io.BytesIO(data), dest, allow_devices=False)
    assert not (dest / "dev/sda").exists()
    _untouched(outside)


def test_existing_symlink_is_replaced_not_followed(box: tuple[Path, Path]) -> None:
    """A later entry with the same name as a symlink replaces the link; it never writes to its target."""
    dest, outside = box
    data = _tar([(_i("victim", tarfile.SYMTYPE, linkname="../outside/victim"), b""), (_i("victim"), b"mine\n")])
    unpack_stream(io.BytesIO(data), dest)
    assert not (dest / "victim").is_symlink() and (dest / "victim").read_text() == "mine\n"
    _untouched(outside)


def test_garbage_is_a_clear_error(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(gzip.compress(b"this is not a tar archive at all" * 40))
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(UnpackError):
        unpack_blob(blob, dest)
