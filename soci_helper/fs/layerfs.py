"""The pyfuse3 filesystem of one layer: answers from the inode table, file data through the span reader."""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any, Protocol

import pyfuse3
import trio

from ..config import FuseConfig
from ..errors import SociError
from .inodes import InodeTable

log = logging.getLogger(__name__)

_BLOCK = 4096
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class SpanReader(Protocol):
    """What the filesystem needs from the span manager."""

    def read_buffer(self, offset: int, length: int, ahead_limit: int | None = None) -> bytes | memoryview: ...

    def ready(self, offset: int, length: int) -> bool: ...


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


class LayerFS(pyfuse3.Operations):
    """Read-only: every call that would change the tree answers EROFS."""

    enable_writeback_cache = False
    supports_dot_lookup = False

    def __init__(self, table: InodeTable, reader: SpanReader, fuse: FuseConfig | None = None,
                 on_read: Any = None) -> None:
        super().__init__()
        self.table = table
        self.reader = reader
        fuse = fuse or FuseConfig()
        self.attr_timeout = float(fuse.attr_timeout)
        self.entry_timeout = float(fuse.entry_timeout)
        self.negative_timeout = float(fuse.negative_timeout)
        self.on_read = on_read  # called before each data read (background fetch pauses on activity)
        self.recorder: Any = None  # a ReadRecorder when the operator asked for load orders
        self.read_errors = 0

    # --- attributes ----------------------------------------------------

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        t = self.table
        a = pyfuse3.EntryAttributes()
        mode = t.mode[ino]
        mtime = t.mtime_ns(ino)
        size = _BLOCK if mode & _S_IFMT == _S_IFDIR else t.size[ino]
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = mode
        a.st_nlink = t.nlink[ino]
        a.st_uid = t.uid[ino]
        a.st_gid = t.gid[ino]
        if t.rdev:
            a.st_rdev = t.rdev.get(ino, 0)
        a.st_size = size
        a.st_blksize = _BLOCK
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = mtime
        a.st_mtime_ns = mtime
        a.st_ctime_ns = mtime
        return a

    def _check(self, ino: int) -> int:
        if not 0 < ino < len(self.table.mode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return ino

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # overlayfs refuses a lower layer whose filesystem has no statfs.
        s = pyfuse3.StatvfsData()
        s.f_bsize = _BLOCK
        s.f_frsize = _BLOCK
        s.f_blocks = (self.table.total_size + _BLOCK - 1) // _BLOCK
        s.f_bfree = 0
        s.f_bavail = 0
        s.f_files = len(self.table)
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        t = self.table
        if not t.is_dir(self._check(parent_inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs(parent_inode)
        if name == b"..":
            return self._attrs(t.parent[parent_inode])
        ino = t.lookup_ino(parent_inode, name)
        if not ino:
            # A zero-inode reply lets the kernel cache the miss for negative_timeout.
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = self.negative_timeout
            return miss
        return self._attrs(ino)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._check(inode))

    async def forget(self, inode_list: Any) -> None:
        # The table is fixed for the mount's life; nothing to release.
        return None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if self.table.mode[self._check(inode)] & _S_IFMT != stat.S_IFLNK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return self.table.target.get(inode, b"")

    # --- directories ---------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if not self.table.is_dir(self._check(inode)):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        t = self.table
        first, end = t.entry_range(fh)
        # Offsets are positions in a listing that never changes, so a resumed readdir continues exactly.
        for k in range(first + start_id, end):
            name, ino = t.entry_at(k)
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), k - first + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # --- files ---------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._check(inode)
        if flags & _WRITE_FLAGS:
            raise _erofs()
        if self.table.is_dir(inode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        # keep_cache: the layer never changes, so the page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        t = self.table
        fsize = t.size[self._check(fh)]
        if t.mode[fh] & _S_IFMT != _S_IFREG or off >= fsize or size <= 0:
            return b""
        n = min(size, fsize - off)
        if self.on_read is not None:
            self.on_read()
        if self.recorder is not None:
            self.recorder.add(fh, off, n)
        start = t.offset[fh] + off
        file_end = t.offset[fh] + fsize
        try:
            # A view where it can be: pyfuse3 copies it into the reply, so a copy here would be a second one.
            if self.reader.ready(start, n):
                # In memory or one pread of a file in use: a thread hop would cost more than the read.
                return self.reader.read_buffer(start, n, file_end)  # type: ignore[return-value]
            return await trio.to_thread.run_sync(self.reader.read_buffer, start, n, file_end)  # type: ignore[return-value]
        except SociError as exc:
            self.read_errors += 1
            log.error("read of inode %d at %d+%d failed: %s", fh, off, n, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as exc:  # noqa: BLE001 - an unexpected error must not stop the whole mount
            self.read_errors += 1
            log.error("read of inode %d at %d+%d failed: %s: %s", fh, off, n, type(exc).__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def flush(self, fh: int) -> None:
        # ENOSYS makes the kernel stop sending flush for this mount: noticeably faster on small files.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        return None

    # --- xattrs ----------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        xattrs = self.table.xattrs.get(self._check(inode))
        if not xattrs or name not in xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return xattrs[name]

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        xattrs = self.table.xattrs.get(self._check(inode))
        return list(xattrs) if xattrs else []

    # --- everything that writes -------------------------------------------

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        raise _erofs()

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        raise _erofs()

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        raise _erofs()

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise _erofs()

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        raise _erofs()

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise _erofs()

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        raise _erofs()

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise _erofs()

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: Any) -> None:
        raise _erofs()

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise _erofs()

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise _erofs()

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        raise _erofs()
