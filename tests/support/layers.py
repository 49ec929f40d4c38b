"""Real test layers for the whole suite: tars built with GNU tar and tarfile, and their gzip forms."""

from __future__ import annotations

import gzip
import io
import os
import random
import shutil
import struct
import subprocess
import sysconfig
import tarfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "BIG_FILE_NAME",
    "BIG_FILE_SIZE",
    "DUPLICATE_NAME",
    "GZIP_METHODS",
    "edge_case_layer",
    "gzip_layer",
    "real_files_layer",
]

# Content timestamps: fixed so layers are reproducible; the fraction checks nanosecond handling.
MTIME_NS = 1_700_000_000_123_456_789
DIR_MTIME_NS = 1_600_000_000_000_000_001
OLD_MTIME = -86_400 * 400  # before the epoch: GNU format stores it base-256

BIG_FILE_NAME = "data/big.bin"
# Larger than 16 spans of 64 KiB, and not a multiple of 512, so the last block is padded.
BIG_FILE_SIZE = (17 << 16) + 12_345
DUPLICATE_NAME = "dup/file.txt"

GZIP_METHODS = ("gzip", "pigz", "multimember")

# A VFS_CAP_REVISION_2 capability set granting CAP_NET_BIND_SERVICE (bit 10), effective.
CAPABILITY_XATTR = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)

_PAX_OPTIONS = "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime"


def _target(dst: str | os.PathLike[str], default_name: str) -> Path:
    """`dst` is either the .tar to write or a directory to write `default_name` into."""
    p = Path(dst)
    if p.suffix == ".tar":
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    p.mkdir(parents=True, exist_ok=True)
    return p / default_name


def _run(args: Sequence[str | os.PathLike[str]], ok_codes: tuple[int, ...] = (0,)) -> None:
    proc = subprocess.run(
        [os.fspath(a) for a in args], capture_output=True, env={**os.environ, "LC_ALL": "C"}
    )
    if proc.returncode not in ok_codes:
        raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")


def real_files_layer(
    dst: str | os.PathLike[str],
    src_dirs: Sequence[str | os.PathLike[str]] | None = None,
    exclude: Sequence[str] = ("config-3*",),
    tar_format: str = "gnu",
) -> Path:
    """A GNU tar (sorted, so reproducible for unchanged sources) of real directories, relative to '/'.

    By default: this interpreter's standard library without its large static-library directory, about
    25-30 MB of real files, directories and symlinks.
    """
    out = _target(dst, "real.tar")
    dirs = [Path(d) for d in (src_dirs or [sysconfig.get_paths()["stdlib"]])]
    rel = [str(d.resolve().relative_to("/")) for d in dirs]
    args: list[str | os.PathLike[str]] = [
        "tar", f"--format={tar_format}", "--sort=name", "--warning=no-file-ignored", "-cf", out, "-C", "/",
    ]
    args += [f"--exclude={pattern}" for pattern in exclude]
    # Exit status 1 means a file changed while being read; the archive is still valid.
    _run([*args, *rel], ok_codes=(0, 1))
    return out


def gzip_layer(tar_path: str | os.PathLike[str], method: str = "gzip", level: int = 6) -> Path:
    """Compress a tar next to it and return the .tar.gz path.

    `gzip` and `pigz` run those tools (`-n`, so the output is reproducible); pigz emits many deflate
    blocks with sync markers. `multimember` writes one gzip member per MiB of input, concatenated.
    """
    src = Path(tar_path)
    stem = src.name[: -len(".tar")] if src.name.endswith(".tar") else src.name
    out = src.with_name(f"{stem}-{method}{level}.tar.gz")
    if method in ("gzip", "pigz"):
        if shutil.which(method) is None:
            raise RuntimeError(f"{method} is not installed")
        with open(out, "wb") as f:
            proc = subprocess.run([method, "-n", "-c", f"-{level}", os.fspath(src)], stdout=f)
        if proc.returncode != 0:
            raise RuntimeError(f"{method} failed ({proc.returncode})")
    elif method == "multimember":
        with open(src, "rb") as fin, open(out, "wb") as fout:
            while chunk := fin.read(1 << 20):
                fout.write(gzip.compress(chunk, compresslevel=level, mtime=0))
    else:
        raise ValueError(f"unknown gzip method {method!r}; use one of {GZIP_METHODS}")
    return out


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _try_setxattr(path: Path, name: str, value: bytes) -> None:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError:
        pass  # the filesystem or our privileges may not allow it; the tarfile part carries xattrs anyway


def _build_pax_tree(root: Path) -> list[str]:
    """The tree GNU tar archives in PAX format. Returns the top-level names to archive."""
    rng = random.Random(20231114)
    _write(root / "etc/hostname", b"layer\n")
    _write(root / "bin/suid-tool", b"#!/bin/sh\n", 0o4755)
    _write(root / "bin/sgid-tool", b"#!/bin/sh\n", 0o2755)
    _write(root / "bin/all-bits", b"", 0o7777)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    _write(root / "data/empty", b"")
    _write(root / "data/hello.txt", b"hello world\n")
    _write(root / BIG_FILE_NAME, rng.randbytes(BIG_FILE_SIZE))
    _write(root / "data/exact-block", b"b" * 1024)
    os.link(root / "data/hello.txt", root / "data/hello-hard")
    os.symlink("hello.txt", root / "data/link-rel")
    os.symlink("/etc/hostname", root / "data/link-abs")
    os.symlink("../../nowhere", root / "data/link-dangling")
    os.symlink("t" * 150, root / "data/link-long-target")
    # A path split into ustar prefix + name, and one whose last component alone needs a PAX path record.
    _write(root / ("long/" + "d" * 90 + "/" + "e" * 60 + ".txt"), b"prefix split\n")
    _write(root / ("long/" + "f" * 130 + ".txt"), b"pax path\n")
    _write(root / "unicode/café.txt", "é\n".encode())
    _write(root / "unicode/日本語/ファイル.txt", b"nihongo\n")
    _write(root / "unicode/emoji-\U0001f600", b"")
    _write(root / "names/with space", b"space\n")
    _write(root / "names/-dash", b"")
    _write(root / "whiteout/.wh.gone", b"")
    (root / "whiteout/opaque").mkdir(parents=True)
    _write(root / "whiteout/opaque/.wh..wh..opq", b"")
    _write(root / "xattr/file", b"with xattrs\n")
    _try_setxattr(root / "xattr/file", "user.comment", b"hello")
    _try_setxattr(root / "xattr/file", "user.binary", bytes(range(256)))
    _try_setxattr(root / "xattr/file", "security.capability", CAPABILITY_XATTR)
    (root / "dev").mkdir()
    os.mkfifo(root / "dev/fifo", 0o600)
    try:
        os.mknod(root / "dev/null-like", 0o666 | 0o020000, os.makedev(1, 3))
        os.mknod(root / "dev/loop-like", 0o660 | 0o060000, os.makedev(7, 200))
    except PermissionError:
        pass  # devices need root; the tarfile part has devices regardless
    _set_times(root)
    return sorted(p.name for p in root.iterdir())


def _set_times(root: Path) -> None:
    # Children first, since touching a child changes its directory's mtime.
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(Path(dirpath, name), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
        os.utime(dirpath, ns=(DIR_MTIME_NS, DIR_MTIME_NS))


def _build_gnu_tree(root: Path) -> list[str]:
    """The tree GNU tar archives in GNU format: 'L'/'K' long names, raw non-UTF-8 bytes, base-256 fields."""
    deep = root / "gnu" / ("g" * 80) / ("h" * 80)
    _write(deep / "long-name-file.txt", b"gnu long name\n")
    os.symlink("/" + "/".join(["target"] * 30), root / "gnu/link-to-long-target")
    os.link(deep / "long-name-file.txt", root / "gnu/hardlink-to-long-name")
    raw = os.fsencode(root / "gnu") + b"/latin1-caf\xe9.txt"
    with open(raw, "wb") as f:
        f.write(b"latin-1 name\n")
    _write(root / "gnu/old-file", b"from 1968\n")
    _set_times(root)
    os.utime(root / "gnu/old-file", (OLD_MTIME, OLD_MTIME))
    return ["gnu"]


def _tarinfo(name: str, **fields: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 1_650_000_000
    info.mode = 0o644
    info.uname, info.gname = "root", "root"
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _build_tarfile_part(path: Path, global_header: bool) -> None:
    """Entries only tarfile writes conveniently: exact PAX records, devices without root, duplicates."""
    pax_global = {"comment": "built for tests"} if global_header else None
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, pax_headers=pax_global) as tf:

        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data) if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            tf.addfile(info, io.BytesIO(data) if data else None)

        add(_tarinfo("dup/", type=tarfile.DIRTYPE, mode=0o755))
        add(_tarinfo(DUPLICATE_NAME), b"first version\n")
        xattrs = _tarinfo("py/xattrs", uid=1000, gid=1000, uname="alice", gname="staff")
        xattrs.pax_headers = {
            "SCHILY.xattr.user.mime_type": "text/plain",
            "SCHILY.xattr.user.binary": bytes(range(256)).decode("utf-8", "surrogateescape"),
            "SCHILY.xattr.security.capability": CAPABILITY_XATTR.decode("utf-8", "surrogateescape"),
            "mtime": "1650000000.5",
        }
        add(xattrs, b"xattrs\n")
        add(_tarinfo("py/char-dev", type=tarfile.CHRTYPE, devmajor=4, devminor=64, mode=0o620))
        add(_tarinfo("py/block-dev", type=tarfile.BLKTYPE, devmajor=259, devminor=70000, mode=0o660))
        add(_tarinfo("py/fifo", type=tarfile.FIFOTYPE, mode=0o644))
        big_ids = _tarinfo("py/big-ids", uid=5_000_000, gid=6_000_000, uname="jos\u00e9", gname="\u00e9quipe")
        add(big_ids, b"ids\n")
        ns = _tarinfo("py/nanos")
        ns.pax_headers = {"mtime": "1700000000.000000001"}
        add(ns, b"")
        # Pre-POSIX '\0' typeflag: a regular file, or a directory when the name ends in '/'.
        add(_tarinfo("py/old-style-file", type=tarfile.AREGTYPE), b"v7\n")
        add(_tarinfo("py/old-style-dir/", type=tarfile.AREGTYPE, mode=0o755))
        add(_tarinfo("py/hardlink-to-hello", type=tarfile.LNKTYPE, linkname="data/hello.txt"))
        # Directories implied only by their children: no entries for implied/, implied/a/, implied/a/b/.
        add(_tarinfo("implied/a/b/c.txt"), b"implied parents\n")
        add(_tarinfo("whiteout/.wh.py"), b"")
        add(_tarinfo(DUPLICATE_NAME, mode=0o600), b"second version wins\n")


def edge_case_layer(dst: str | os.PathLike[str], global_header: bool = False) -> Path:
    """One tar with every feature a layer can carry, in GNU and PAX formats, built by GNU tar and tarfile.

    Parts, concatenated with `tar --concatenate`: GNU tar `--format=pax` of a prepared tree (long names
    by ustar prefix and by PAX path, long link targets, hardlinks, symlinks, fifo, devices when root,
    xattrs when the filesystem allows, setuid/setgid/sticky, nanosecond mtimes, a multi-span file,
    whiteouts, non-ASCII names); GNU tar `--format=gnu` of a second tree ('L'/'K' records, a non-UTF-8
    name, base-256 owner ids and a pre-epoch mtime); a tarfile PAX part (exact xattr records including
    binary values, devices, '\\0' typeflags, implied directories, and a duplicate of an earlier entry that
    wins). `global_header` adds a PAX global header, which upstream SOCI refuses.
    """
    out = _target(dst, "edge.tar")
    work = out.parent / (out.name + ".build")
    if work.exists():
        shutil.rmtree(work)
    try:
        pax_root, gnu_root = work / "pax", work / "gnu"
        pax_root.mkdir(parents=True)
        gnu_root.mkdir()
        names = _build_pax_tree(pax_root)
        gnu_names = _build_gnu_tree(gnu_root)
        gnu_tar, py_tar = work / "gnu.tar", work / "py.tar"
        common = ["--sort=name", "--no-acls", "--no-selinux"]
        _run(
            ["tar", "--format=pax", *common, "--xattrs", "--xattrs-include=*", _PAX_OPTIONS,
             "--owner=root:0", "--group=root:0", "-cf", out, "-C", pax_root, *names]
        )
        _run(
            ["tar", "--format=gnu", *common, "--owner=bigowner:3000000", "--group=biggroup:4000000",
             "-cf", gnu_tar, "-C", gnu_root, *gnu_names]
        )
        _build_tarfile_part(py_tar, global_header)
        # One archive per run: GNU tar given several at once leaves end markers between them.
        for part in (gnu_tar, py_tar):
            _run(["tar", "--concatenate", "-f", out, part])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
