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
from .inodes import InodeTable, Node

log = logging.getLogger(__name__)

_BLOCK = 4096
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class SpanReader(Protocol):
    """What the filesystem needs from the span manager (or any stand-in)."""

    def read(self, offset: int, length: int) -> bytes: ...


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
        self.read_errors = 0

    # --- attributes ----------------------------------------------------

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.entry_timeout
        a.attr_timeout = self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size if node.children is None else _BLOCK
        a.st_blksize = _BLOCK
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = node.mtime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.mtime_ns
        return a

    def _node(self, ino: int) -> Node:
        try:
            node = self.table.nodes[ino]
        except IndexError:
            node = None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

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
        parent = self._node(parent_inode)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._node(parent.parent))
        ino = parent.children.get(name)
        if ino is None:
            # A zero-inode reply lets the kernel cache the miss for negative_timeout.
            miss = pyfuse3.EntryAttributes()
            miss.st_ino = 0
            miss.entry_timeout = self.negative_timeout
            return miss
        return self._attrs(self._node(ino))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def forget(self, inode_list: Any) -> None:
        # The table is fixed for the mount's life; nothing to release.
        return None

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    # --- directories ---------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if node.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self.table.listing(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.table.listing(fh)
        # Offsets are positions in a listing that never changes, so a resumed readdir continues exactly.
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attrs(self._node(ino)), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        return None

    # --- files ---------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & _WRITE_FLAGS:
            raise _erofs()
        if node.children is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        # keep_cache: the layer never changes, so the page cache stays valid across opens.
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        if not stat.S_ISREG(node.mode) or off >= node.size or size <= 0:
            return b""
        n = min(size, node.size - off)
        if self.on_read is not None:
            self.on_read()
        try:
            return await trio.to_thread.run_sync(self.reader.read, node.offset + off, n)
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
        xattrs = self._node(inode).xattrs
        if not xattrs or name not in xattrs:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return xattrs[name]

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        xattrs = self._node(inode).xattrs
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
