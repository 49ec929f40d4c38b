"""The inode table of one layer: every tar entry of a zTOC as a read-only tree, with overlayfs whiteouts."""

from __future__ import annotations

import logging
import stat
from collections.abc import Callable

from ..ztoc.model import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, FileMetadata, Ztoc, parse_mod_time

log = logging.getLogger(__name__)

ROOT_INO = 1  # what FUSE (and pyfuse3.ROOT_INODE) calls the root
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"
_XATTR_PREFIX = "SCHILY.xattr."
_PERM_BITS = 0o7777
_IMPLIED_DIR_MODE = stat.S_IFDIR | 0o755

_TYPE_BITS = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
              BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}


class Node:
    """One inode. Directories hold `children` (name -> ino, in tar order); hardlinks share one Node."""

    __slots__ = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "offset", "target",
                 "xattrs", "children", "listing", "parent")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0, size: int = 0, mtime_ns: int = 0,
                 rdev: int = 0, offset: int = 0, target: bytes = b"", parent: int = ROOT_INO) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.rdev = rdev
        self.nlink = 1
        self.offset = offset  # where the data starts in the uncompressed tar (regular files)
        self.target = target  # symlink target
        self.xattrs: dict[bytes, bytes] | None = None
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.listing: list[tuple[bytes, int]] | None = None  # readdir snapshot, built on first use
        self.parent = parent

    @property
    def is_dir(self) -> bool:
        return self.children is not None


def _makedev(major: int, minor: int) -> int:
    # Linux's encoding (as os.makedev), without its range checks on hostile values.
    major &= 0xFFFFFFFF
    minor &= 0xFFFFFFFF
    return ((major & 0xFFF) << 8) | ((major & ~0xFFF) << 32) | (minor & 0xFF) | ((minor & ~0xFF) << 12)


def split_name(name: str) -> list[bytes] | None:
    """The path components of a tar name, or None when it must be refused.

    Leading `/` and `./` are dropped (tar strips them on extraction too); `.` and empty components are
    ignored; a `..` component or a NUL byte refuses the entry, since either could reach outside the layer.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        return None
    if (b".." not in raw and b"//" not in raw and b"/./" not in raw and raw[:1] not in (b"/", b".")
            and not raw.endswith(b"/.")):
        return raw.rstrip(b"/").split(b"/") if raw else []
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        return None
    return parts


class InodeTable:
    """All inodes of one layer; built once from the zTOC, never changed afterwards."""

    def __init__(self, ztoc: Ztoc, on_warning: Callable[[str], None] | None = None) -> None:
        self.warn = on_warning or log.warning
        self.nodes: list[Node | None] = [None]  # index = inode number; 0 is unused
        root = Node(ROOT_INO, _IMPLIED_DIR_MODE, parent=ROOT_INO)
        self.nodes.append(root)
        self.archive_end = ztoc.uncompressed_archive_size
        self.total_size = 0
        self.warnings = 0
        self._times: dict[str, int] = {}
        self._days: dict[str, int] = {}
        self._build(ztoc.files)
        self._count_dir_links()

    # --- lookups -------------------------------------------------------

    def get(self, ino: int) -> Node:
        return self.nodes[ino]  # type: ignore[return-value]

    @property
    def root(self) -> Node:
        return self.get(ROOT_INO)

    def __len__(self) -> int:
        return len(self.nodes) - 1

    def lookup(self, parent: int, name: bytes) -> Node | None:
        children = self.get(parent).children
        if children is None:
            return None
        ino = children.get(name)
        return None if ino is None else self.get(ino)

    def resolve(self, path: str) -> Node | None:
        """The node at a path inside the layer (for tests and tools), without following symlinks."""
        node = self.root
        for part in (p for p in path.encode("utf-8", "surrogateescape").split(b"/") if p and p != b"."):
            found = self.lookup(node.ino, part)
            if found is None:
                return None
            node = found
        return node

    def listing(self, ino: int) -> list[tuple[bytes, int]]:
        """A directory's entries in a fixed order, so readdir offsets stay valid across calls."""
        node = self.get(ino)
        if node.listing is None:
            node.listing = list(node.children.items()) if node.children is not None else []
        return node.listing

    # --- building ------------------------------------------------------

    def _refuse(self, f: FileMetadata, why: str) -> None:
        self.warnings += 1
        self.warn(f"refused tar entry {f.name!r}: {why}")

    def _new(self, mode: int, parent: int) -> Node:
        node = Node(len(self.nodes), mode, parent=parent)
        self.nodes.append(node)
        return node

    def _dir_of(self, parts: list[bytes]) -> Node | None:
        """The directory holding `parts[-1]`, creating implied parents; None if a non-directory is in the way."""
        node = self.nodes[ROOT_INO]
        assert node is not None
        for part in parts[:-1]:
            children = node.children
            assert children is not None
            ino = children.get(part)
            if ino is None:
                child = self._new(_IMPLIED_DIR_MODE, node.ino)
                children[part] = child.ino
                node = child
                continue
            child = self.nodes[ino]
            assert child is not None
            if child.children is None:
                return None
            node = child
        return node

    def _unlink(self, parent: Node, name: bytes) -> None:
        assert parent.children is not None
        old = parent.children.pop(name, None)
        if old is not None:
            node = self.nodes[old]
            assert node is not None
            node.nlink -= 1
            if node.nlink <= 0 and node.children is None:
                self.total_size -= node.size

    def _build(self, files: list[FileMetadata]) -> None:
        for f in files:
            parts = split_name(f.name)
            if parts is None:
                self._refuse(f, "name has a '..' component or a NUL byte")
                continue
            if f.name.startswith("/"):
                self.warnings += 1
                self.warn(f"tar entry {f.name!r}: absolute name taken relative to the layer root")
            if not parts:
                if f.type == DIR:
                    self._set_attrs(self.root, f, stat.S_IFDIR)  # the archive's "./" entry
                else:
                    self._refuse(f, "empty name")
                continue
            why = self._bad_entry(f)
            if why:
                self._refuse(f, why)
                continue
            parent = self._dir_of(parts)
            if parent is None:
                self._refuse(f, "a parent is not a directory")
                continue
            name = parts[-1]
            if name == OPAQUE_MARKER:
                if parent.xattrs is None:
                    parent.xattrs = {}
                parent.xattrs[OPAQUE_XATTR] = b"y"
                continue
            if f.type == HARDLINK:
                self._add_hardlink(f, parent, name)
                continue
            if name.startswith(WHITEOUT_PREFIX):
                self._add_whiteout(f, parent, name[len(WHITEOUT_PREFIX):])
                continue
            self._add_entry(f, parent, name)

    def _count_dir_links(self) -> None:
        # A directory's link count is 2 plus one per subdirectory ("." and each child's "..").
        nodes = self.nodes
        for node in nodes:
            if node is None or node.children is None:
                continue
            subdirs = 0
            for ino in node.children.values():
                if nodes[ino].children is not None:  # type: ignore[union-attr]
                    subdirs += 1
            node.nlink = 2 + subdirs

    def _parse_time(self, f: FileMetadata, text: str) -> int:
        # Fast path for what Go writes (`2023-11-14T22:13:20[.123456789]Z`): the calendar part is cached per
        # day, since datetime parsing costs more than the rest of building an entry.
        ns: int | None = None
        if len(text) >= 20 and text[-1] == "Z" and text[10] == "T" and text[13] == ":" and text[16] == ":":
            frac = text[19:-1]
            day = self._days.get(text[:10])
            if day is None:
                try:
                    day = parse_mod_time(text[:10] + "T00:00:00Z")[0]
                except ValueError:
                    day = None
                else:
                    self._days[text[:10]] = day
            clock = text[11:19]
            if day is not None and clock[:2].isdigit() and clock[3:5].isdigit() and clock[6:8].isdigit() and (
                    not frac or (frac[0] == "." and 1 < len(frac) <= 10 and frac[1:].isdigit())):
                secs = day + int(clock[:2]) * 3600 + int(clock[3:5]) * 60 + int(clock[6:8])
                ns = secs * 1_000_000_000 + (int(frac[1:].ljust(9, "0")) if frac else 0)
        if ns is None:
            try:
                secs, nanos = parse_mod_time(text)
                ns = secs * 1_000_000_000 + nanos
            except ValueError:
                self.warnings += 1
                self.warn(f"tar entry {f.name!r}: bad mod_time {text!r}, using 0")
                ns = 0
        if len(self._times) < 65536:
            self._times[text] = ns
        return ns

    def _set_attrs(self, node: Node, f: FileMetadata, type_bits: int) -> None:
        node.mode = type_bits | (f.mode & _PERM_BITS)
        node.uid = f.uid
        node.gid = f.gid
        text = f.mod_time
        if text:
            ns = self._times.get(text)
            if ns is None:
                ns = self._parse_time(f, text)
            node.mtime_ns = ns
        else:
            node.mtime_ns = 0
        xattrs = None
        if f.pax:
            for k, v in f.pax.items():
                if k.startswith(_XATTR_PREFIX):
                    if xattrs is None:
                        xattrs = {}
                    xattrs[k[len(_XATTR_PREFIX):].encode("utf-8", "surrogateescape")] = v
        if node.children is not None and node.xattrs and OPAQUE_XATTR in node.xattrs:
            # A directory entry after its own opaque marker keeps the marker.
            xattrs = dict(xattrs or {})
            xattrs[OPAQUE_XATTR] = node.xattrs[OPAQUE_XATTR]
        node.xattrs = xattrs

    def _bad_entry(self, f: FileMetadata) -> str:
        """Why an entry cannot be served at all ("" when it can), checked before any parent is created."""
        if f.type == HARDLINK:
            return ""
        if f.type not in _TYPE_BITS:
            return f"unknown type {f.type!r}"
        if f.type == REG:
            off, size = f.uncompressed_offset, f.uncompressed_size
            if off < 0 or size < 0 or off + size > self.archive_end:
                return f"data range {off}+{size} runs past the archive end ({self.archive_end})"
        return ""

    def _add_entry(self, f: FileMetadata, parent: Node, name: bytes) -> None:
        type_bits = _TYPE_BITS[f.type]
        children = parent.children
        assert children is not None
        existing = children.get(name)
        if type_bits == stat.S_IFDIR and existing is not None:
            node = self.nodes[existing]
            assert node is not None
            if node.children is not None:
                # tar keeps an existing directory (and its contents) and only updates its attributes.
                self._set_attrs(node, f, stat.S_IFDIR)
                return
        if existing is not None:
            self._unlink(parent, name)  # a later entry wins, as in tar
        node = self._new(type_bits, parent.ino)
        self._set_attrs(node, f, type_bits)
        if type_bits == stat.S_IFREG:
            node.size = f.uncompressed_size
            node.offset = f.uncompressed_offset
            self.total_size += node.size
        elif type_bits == stat.S_IFLNK:
            node.target = f.linkname.encode("utf-8", "surrogateescape")
            node.size = len(node.target)
        elif type_bits in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = _makedev(f.devmajor, f.devminor)
        children[name] = node.ino

    def _add_whiteout(self, f: FileMetadata, parent: Node, name: bytes) -> None:
        if not name or name in (b".", b".."):
            self._refuse(f, "whiteout of nothing")
            return
        assert parent.children is not None
        if name in parent.children:
            self._unlink(parent, name)
        node = self._new(stat.S_IFCHR, parent.ino)
        self._set_attrs(node, f, stat.S_IFCHR)
        # overlayfs recognises a whiteout by type and device only; permission bits do not matter.
        node.rdev = 0
        parent.children[name] = node.ino

    def _add_hardlink(self, f: FileMetadata, parent: Node, name: bytes) -> None:
        target_parts = split_name(f.linkname)
        if not target_parts:
            self._refuse(f, f"hardlink target {f.linkname!r} is unusable")
            return
        target_dir = self.root
        target: Node | None = None
        for i, part in enumerate(target_parts):
            found = self.lookup(target_dir.ino, part)
            if found is None:
                break
            if i == len(target_parts) - 1:
                target = found
            elif found.children is None:
                break
            else:
                target_dir = found
        if target is None:
            self._refuse(f, f"hardlink target {f.linkname!r} is missing")
            return
        if target.children is not None:
            self._refuse(f, f"hardlink target {f.linkname!r} is a directory")
            return
        assert parent.children is not None
        if parent.children.get(name) == target.ino:
            return  # linking a name to itself changes nothing
        if name in parent.children:
            self._unlink(parent, name)
        parent.children[name] = target.ino
        target.nlink += 1
