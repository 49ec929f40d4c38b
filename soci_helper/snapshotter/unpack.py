"""Safe local unpack of one image layer into a snapshot directory, as overlayfs wants it (whiteouts as 0/0 devices)."""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..errors import LayerError

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
_XATTR_PAX = "SCHILY.xattr."
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnpackError(LayerError):
    """A layer entry was refused (unsafe path, link escaping the layer, refused type) or could not be written."""


@dataclass(slots=True)
class UnpackStats:
    entries: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    skipped_xattrs: int = 0
    diff_id: str = ""  # sha256 of the whole uncompressed stream, known once unpack() returns


@dataclass(slots=True)
class _Pending:
    """Directory metadata applied last: writing children would change mtimes, and a 0o500 mode would stop them."""

    parts: tuple[str, ...]
    mode: int
    mtime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)


def split_name(name: str) -> tuple[str, ...]:
    """A tar member name as path components below the layer root; UnpackError for anything escaping it."""
    if "\x00" in name:
        raise UnpackError(f"entry {name!r}: NUL byte in name")
    if name.startswith("/"):
        raise UnpackError(f"entry {name!r}: absolute path")
    parts = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            raise UnpackError(f"entry {name!r}: '..' would escape the layer")
        parts.append(p)
    return tuple(parts)


class _HashingReader:
    """Passes reads through while hashing every byte: the layer's diffID is the sha256 of the whole stream."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.h = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        self.h.update(b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def sniff_compression(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head == _ZSTD_MAGIC:
        return "zstd"
    return "none"


@contextlib.contextmanager
def open_decompressed(path: Path, compression: str) -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of a layer blob. zstd goes through the `zstd` command (no zstd module is
    a dependency); gzip through the stdlib, which also reads multi-member (pigz) blobs."""
    if compression == "gzip":
        with gzip.open(path, "rb") as g:
            yield g  # type: ignore[misc]
    elif compression == "zstd":
        zstd = shutil.which("zstd")
        if zstd is None:
            raise UnpackError("zstd layers need the zstd command, which is not installed")
        p = subprocess.Popen([zstd, "-d", "-c", "-q", "--", str(path)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert p.stdout is not None
        try:
            yield p.stdout
            # The caller drained the stream; any leftover would only be an error message's worth.
            p.stdout.read()
        finally:
            p.stdout.close()
            err = p.stderr.read().decode(errors="replace").strip() if p.stderr else ""
            rc = p.wait()
            if p.stderr:
                p.stderr.close()
        if rc != 0:
            raise UnpackError(f"zstd -d failed ({rc}): {err[-300:]}")
    elif compression == "none":
        with open(path, "rb") as f:
            yield f
    else:
        raise UnpackError(f"unsupported layer compression {compression!r}")


def _pax_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    out = {}
    for k, v in (m.pax_headers or {}).items():
        if k.startswith(_XATTR_PAX):
            # tarfile decodes PAX values as UTF-8 with surrogateescape; binary values (capabilities) round-trip.
            out[k[len(_XATTR_PAX):]] = v.encode("utf-8", "surrogateescape")
    return out


class _Unpacker:
    def __init__(self, dest: Path, allow_devices: bool) -> None:
        self.dest = dest
        self.allow_devices = allow_devices
        self.root_fd = os.open(dest, _DIR_FLAGS)
        self.stats = UnpackStats()
        self.dirs: dict[tuple[str, ...], _Pending] = {}
        self.is_root = os.geteuid() == 0

    def close(self) -> None:
        os.close(self.root_fd)

    # --- walking without following symlinks ------------------------------------

    def _open_dir(self, parts: tuple[str, ...], name: str, create: bool) -> int:
        """An fd of the directory `parts` below the root; every component is opened with O_NOFOLLOW, so a
        symlink anywhere on the way is refused instead of followed."""
        fd = os.dup(self.root_fd)
        try:
            for i, p in enumerate(parts):
                try:
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise UnpackError(f"entry {name!r}: {'/'.join(parts[:i + 1])} does not exist") from None
                    # An implied parent directory, as tar creates it.
                    os.mkdir(p, 0o755, dir_fd=fd)
                    nfd = os.open(p, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnpackError(f"entry {name!r}: {'/'.join(parts[:i + 1])} is a symlink or not a "
                                          f"directory; refusing to write through it") from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _clear(self, dfd: int, leaf: str, keep_dir: bool) -> None:
        """Make room for a new entry: tar semantics replace what is there (a directory stays for a directory)."""
        try:
            st = os.lstat(leaf, dir_fd=dfd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            shutil.rmtree(leaf, dir_fd=dfd)
        else:
            os.unlink(leaf, dir_fd=dfd)

    # --- entries --------------------------------------------------------------

    def entry(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = split_name(m.name)
        self.stats.entries += 1
        if not parts:
            if m.isdir():
                self.dirs[()] = _Pending((), m.mode & 0o7777, int(m.mtime * 1e9), _pax_xattrs(m))
                self._own(self.root_fd, None, m)
                return
            raise UnpackError(f"entry {m.name!r}: names the layer root but is not a directory")
        parent, leaf = parts[:-1], parts[-1]
        if leaf == OPAQUE_MARKER:
            self._opaque(parent, m.name)
            return
        if leaf.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            log.debug("skipping aufs metadata entry %s", m.name)
            return
        if leaf.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, leaf[len(WHITEOUT_PREFIX):], m)
            return
        dfd = self._open_dir(parent, m.name, create=True)
        try:
            if m.isdir():
                self._mkdir(dfd, parts, leaf, m)
            elif m.isreg():
                self._file(tf, dfd, leaf, m)
            elif m.issym():
                self._clear(dfd, leaf, keep_dir=False)
                # The target is data, not a path we resolve: it only means something inside the container.
                os.symlink(m.linkname, leaf, dir_fd=dfd)
                self._own(dfd, leaf, m, symlink=True)
            elif m.islnk():
                self._hardlink(dfd, leaf, m)
            elif m.ischr() or m.isblk():
                if not self.allow_devices:
                    raise UnpackError(f"entry {m.name!r}: device files are refused here")
                if m.ischr() and m.devmajor == 0 and m.devminor == 0:
                    # overlayfs would read it as a whiteout the layer did not declare with a .wh. entry.
                    raise UnpackError(f"entry {m.name!r}: a 0/0 character device is an overlay whiteout in "
                                      f"disguise")
                self._clear(dfd, leaf, keep_dir=False)
                kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
                os.mknod(leaf, kind | (m.mode & 0o7777), os.makedev(m.devmajor, m.devminor), dir_fd=dfd)
                self._own(dfd, leaf, m)
            elif m.isfifo():
                self._clear(dfd, leaf, keep_dir=False)
                os.mkfifo(leaf, m.mode & 0o7777, dir_fd=dfd)
                self._own(dfd, leaf, m)
            else:
                raise UnpackError(f"entry {m.name!r}: unsupported tar entry type {m.type!r}")
        finally:
            os.close(dfd)

    def _mkdir(self, dfd: int, parts: tuple[str, ...], leaf: str, m: tarfile.TarInfo) -> None:
        self._clear(dfd, leaf, keep_dir=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(leaf, 0o755, dir_fd=dfd)
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=dfd)
        try:
            if self.is_root:
                os.fchown(fd, m.uid, m.gid)
        finally:
            os.close(fd)
        self.dirs[parts] = _Pending(parts, m.mode & 0o7777, int(m.mtime * 1e9), _pax_xattrs(m))

    def _file(self, tf: tarfile.TarFile, dfd: int, leaf: str, m: tarfile.TarInfo) -> None:
        self._clear(dfd, leaf, keep_dir=False)
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            src = tf.extractfile(m)
            if src is not None:
                while chunk := src.read(_CHUNK):
                    _write_all(fd, chunk)
            self._set_meta(fd, m)
        finally:
            os.close(fd)

    def _hardlink(self, dfd: int, leaf: str, m: tarfile.TarInfo) -> None:
        try:
            tparts = split_name(m.linkname)
        except UnpackError as exc:
            raise UnpackError(f"entry {m.name!r}: hard link target {m.linkname!r} escapes the layer ({exc})") from None
        if not tparts:
            raise UnpackError(f"entry {m.name!r}: hard link to the layer root")
        tfd = self._open_dir(tparts[:-1], m.name, create=False)
        try:
            try:
                st = os.lstat(tparts[-1], dir_fd=tfd)
            except FileNotFoundError:
                raise UnpackError(f"entry {m.name!r}: hard link target {m.linkname!r} is not in this layer") from None
            if stat.S_ISDIR(st.st_mode):
                raise UnpackError(f"entry {m.name!r}: hard link to a directory")
            self._clear(dfd, leaf, keep_dir=False)
            os.link(tparts[-1], leaf, src_dir_fd=tfd, dst_dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(tfd)

    def _whiteout(self, parent: tuple[str, ...], victim: str, m: tarfile.TarInfo) -> None:
        if not victim or victim in (".", ".."):
            raise UnpackError(f"entry {m.name!r}: malformed whiteout")
        dfd = self._open_dir(parent, m.name, create=True)
        try:
            self._clear(dfd, victim, keep_dir=False)
            # overlayfs' whiteout: a character device 0/0.
            os.mknod(victim, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dfd)
            if self.is_root:
                os.chown(victim, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)
        self.stats.whiteouts += 1

    def _opaque(self, parent: tuple[str, ...], name: str) -> None:
        fd = self._open_dir(parent, name, create=True)
        try:
            os.setxattr(fd, OPAQUE_XATTR, b"y")
        finally:
            os.close(fd)
        self.stats.opaque_dirs += 1

    # --- metadata ---------------------------------------------------------------

    def _xattrs(self, target: int | str, xattrs: dict[str, bytes], name: str, follow: bool = True) -> None:
        for k, v in sorted(xattrs.items()):
            if k.startswith("trusted.overlay."):
                # Overlay's own attributes (redirect, metacopy, opaque) must come from .wh. entries only: a
                # redirect could point a directory anywhere in the lower layers.
                self.stats.skipped_xattrs += 1
                log.warning("entry %s: ignoring overlay attribute %s", name, k)
                continue
            try:
                os.setxattr(target, k, v, follow_symlinks=follow)
            except OSError as exc:
                if exc.errno in (errno.ENOTSUP, errno.EPERM) and not k.startswith("security.capability"):
                    self.stats.skipped_xattrs += 1
                    log.debug("entry %s: cannot set xattr %s: %s", name, k, exc.strerror)
                    continue
                raise UnpackError(f"entry {name!r}: cannot set xattr {k}: {exc.strerror}") from None

    def _set_meta(self, fd: int, m: tarfile.TarInfo) -> None:
        if self.is_root:
            os.fchown(fd, m.uid, m.gid)
        # After chown, which clears set-id bits.
        os.fchmod(fd, m.mode & 0o7777)
        self._xattrs(fd, _pax_xattrs(m), m.name)
        ns = int(m.mtime * 1e9)
        os.utime(fd, ns=(ns, ns))

    def _own(self, dfd: int, leaf: str | None, m: tarfile.TarInfo, symlink: bool = False) -> None:
        """Owner, mode, xattrs and mtime of a non-regular entry, never following a symlink."""
        if leaf is None:
            if self.is_root:
                os.fchown(dfd, m.uid, m.gid)
            return
        if self.is_root:
            os.chown(leaf, m.uid, m.gid, dir_fd=dfd, follow_symlinks=False)
        if not symlink:
            _chmod_nofollow(dfd, leaf, m.mode & 0o7777)
        xattrs = _pax_xattrs(m)
        if xattrs:
            # /proc/self/fd/N names the parent directory itself; the leaf is not followed.
            self._xattrs(f"/proc/self/fd/{dfd}/{leaf}", xattrs, m.name, follow=False)
        ns = int(m.mtime * 1e9)
        os.utime(leaf, ns=(ns, ns), dir_fd=dfd, follow_symlinks=False)

    def finish(self) -> None:
        # Deepest first, so setting a parent's mtime comes after its children stopped changing it.
        for parts in sorted(self.dirs, key=len, reverse=True):
            p = self.dirs[parts]
            fd = self.root_fd if not parts else self._open_dir(parts, "/".join(parts), create=False)
            try:
                os.fchmod(fd, p.mode)
                self._xattrs(fd, p.xattrs, "/".join(parts) or ".")
                os.utime(fd, ns=(p.mtime_ns, p.mtime_ns))
            finally:
                if parts:
                    os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _chmod_nofollow(dfd: int, leaf: str, mode: int) -> None:
    # Linux has no lchmod; the entry is not a symlink here, so opening it with O_PATH|O_NOFOLLOW and
    # chmod-ing through /proc changes that inode only (opening a FIFO or device for real could block).
    fd = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def unpack_stream(stream: IO[bytes], dest: Path, *, allow_devices: bool = True) -> UnpackStats:
    """Unpack an uncompressed tar stream into the existing directory `dest`; the returned stats carry the
    stream's diffID. On UnpackError part of the layer may have been written below `dest` (never elsewhere):
    the caller discards the directory."""
    reader = _HashingReader(stream)
    u = _Unpacker(Path(dest), allow_devices)
    try:
        try:
            with tarfile.open(fileobj=reader, mode="r|", errorlevel=2) as tf:  # type: ignore[call-overload]
                for m in tf:
                    u.entry(tf, m)
        except tarfile.TarError as exc:
            raise UnpackError(f"bad tar stream: {exc}") from None
        except OSError as exc:
            if isinstance(exc, UnpackError):
                raise
            raise UnpackError(f"cannot write layer: {exc.strerror or exc}") from None
        u.finish()
        # The diffID covers the padding after the end-of-archive blocks too.
        reader.drain()
    finally:
        u.close()
    u.stats.diff_id = reader.digest()
    return u.stats


def unpack_blob(blob: Path, dest: Path, *, compression: str | None = None, expected_diff_id: str | None = None,
                allow_devices: bool = True) -> UnpackStats:
    """Unpack a layer blob (gzip, zstd or plain tar; sniffed unless given) and check its diffID."""
    comp = compression or sniff_compression(blob)
    with open_decompressed(blob, comp) as raw:
        stats = unpack_stream(raw, dest, allow_devices=allow_devices)
    if expected_diff_id and stats.diff_id != expected_diff_id:
        raise UnpackError(f"layer content is {stats.diff_id}, but the image config says diffID {expected_diff_id}")
    return stats
