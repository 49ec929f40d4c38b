"""The inode table of one layer: every tar entry of a zTOC as a read-only tree, with overlayfs whiteouts."""

from __future__ import annotations

import gc
import logging
import re
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate

from ..ztoc import codec
from ..ztoc.forked import decode_raw_forked as forked_decode_raw
from ..ztoc.model import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, FileMetadata, Ztoc, parse_mod_time

log = logging.getLogger(__name__)

ROOT_INO = 1  # what FUSE (and pyfuse3.ROOT_INODE) calls the root
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
OPAQUE_XATTR = b"trusted.overlay.opaque"
_XATTR_PREFIX = "SCHILY.xattr."
_PERM_BITS = 0o7777
_IMPLIED_DIR_MODE = stat.S_IFDIR | 0o755
_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR
_S_IFREG = stat.S_IFREG

_TYPE_BITS = {REG: stat.S_IFREG, DIR: stat.S_IFDIR, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
              BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO}
# A name needs the careful split when it is empty, starts with `/` or `.`, or holds `/.` (which covers `/./`,
# `/..` and a final `/.`), `//` or NUL. Everything else (nearly every real name) is split with one rpartition;
# three substring tests cost less than one regex search.
_LEADING = b"/."
_MAX_CACHED_TIMES = 65536
_GO_TIME = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d):([0-5]\d)(?:\.(\d{1,9}))?Z").fullmatch
_MIN_NS, _MAX_NS = -(1 << 63), (1 << 63) - 1


class Node:
    """A snapshot of one inode's attributes (the table never changes once built); for tests and tools."""

    __slots__ = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink", "offset", "target",
                 "xattrs", "parent")

    def __init__(self, table: InodeTable, ino: int) -> None:
        self.ino = ino
        self.mode = table.mode[ino]
        self.uid = table.uid[ino]
        self.gid = table.gid[ino]
        self.size = table.size[ino]
        self.mtime_ns = table.mtime_ns(ino)
        self.rdev = table.rdev.get(ino, 0)
        self.nlink = table.nlink[ino]
        self.offset = table.offset[ino]
        self.target = table.target.get(ino, b"")
        self.xattrs = table.xattrs.get(ino)
        self.parent = table.parent[ino]

    @property
    def is_dir(self) -> bool:
        return self.mode & _S_IFMT == _S_IFDIR


def _makedev(major: int, minor: int) -> int:
    # Linux's encoding (as os.makedev), without its range checks on hostile values.
    major &= 0xFFFFFFFF
    minor &= 0xFFFFFFFF
    return ((major & 0xFFF) << 8) | ((major & ~0xFFF) << 32) | (minor & 0xFF) | ((minor & ~0xFF) << 12)


def split_raw(raw: bytes) -> list[bytes] | None:
    """The path components of a raw tar name, or None when it must be refused.

    Leading `/` and `./` are dropped (tar strips them on extraction too); `.` and empty components are
    ignored; a `..` component or a NUL byte refuses the entry, since either could reach outside the layer.
    """
    if b"\0" in raw:
        return None
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        return None
    return parts


def split_name(name: str) -> list[bytes] | None:
    """split_raw for a name as FileMetadata holds it (surrogate-escaped text)."""
    return split_raw(name.encode("utf-8", "surrogateescape"))


def _entries_of(files: list[FileMetadata]) -> Iterable[codec.RawEntry]:
    enc = "utf-8"
    for f in files:
        yield (f.name.encode(enc, "surrogateescape"), f.type, f.uncompressed_offset, f.uncompressed_size,
               f.linkname.encode(enc, "surrogateescape"), f.mode, f.uid, f.gid,
               f.mod_time.encode(enc, "surrogateescape"), f.devmajor, f.devminor, f.pax)


class InodeTable:
    """All inodes of one layer; built once from the zTOC, never changed afterwards.

    Columnar: inode attributes live in arrays indexed by inode number (a 100k-entry layer costs a few MB,
    where one object per inode cost ~60), the rare ones (device numbers, link targets, xattrs) in dicts.
    Directory entries are frozen after the build into one name blob plus arrays, grouped per directory in
    listing order, with a per-directory name-sorted index for lookups by binary search.
    """

    def __init__(self, ztoc: Ztoc, on_warning: Callable[[str], None] | None = None) -> None:
        self._start(ztoc.uncompressed_archive_size, on_warning)
        self._build(_entries_of(ztoc.files))

    @classmethod
    def from_bytes(cls, data: bytes, on_warning: Callable[[str], None] | None = None, *,
                   forked: bool = False,
                   decoded: tuple[Ztoc, Iterator[codec.RawEntry]] | None = None) -> tuple[InodeTable, Ztoc]:
        """(table, zTOC without its entries) straight from a zTOC flatbuffer: no FileMetadata objects.

        forked: decode the entries in a forked child while this process builds (a second core; only from a
        single-threaded process). decoded: codec.decode_raw(data), if the caller has it already. Raises
        ZtocError like codec.decode() for a malformed or inconsistent buffer."""
        if forked:
            head, entries = forked_decode_raw(data, decoded=decoded)
        else:
            head, entries = decoded if decoded is not None else codec.decode_raw(data)
        table = cls.__new__(cls)
        table._start(head.uncompressed_archive_size, on_warning)
        try:
            table._build(entries)
        except codec.UnorderedEntries:
            # Stored out of data order (upstream's writer never does): decode() sorts and checks overlaps.
            ztoc = codec.decode(data)
            table = cls(ztoc, on_warning)
        return table, head

    def _start(self, archive_end: int, on_warning: Callable[[str], None] | None) -> None:
        self.warn = on_warning or log.warning
        self.archive_end = archive_end
        self.total_size = 0
        self.warnings = 0
        # Index = inode number; slot 0 is unused, slot 1 is the root.
        self.mode = array("I", (0, _IMPLIED_DIR_MODE))
        self.uid = array("I", (0, 0))
        self.gid = array("I", (0, 0))
        self.size = array("q", (0, 0))
        # Modification times stay raw until asked for: parsing 100k distinct times was a sixth of the build,
        # and a mount is stat'ed in a small part. mtime_id[ino] indexes the distinct raw times; id 0 is none.
        self.mtime_id = array("I", (0, 0))
        self._tblob = b""
        self._tstart = array("I", (0, 0))
        self._tns = array("q", (0,))
        self._tdone = bytearray(b"\x01")
        self._minutes: dict[bytes, int] = {}  # minute prefix -> seconds, for parsing times that share it
        self.offset = array("q", (0, 0))
        self.nlink = array("I", (0, 1))
        self.parent = array("I", (0, ROOT_INO))
        self.rdev: dict[int, int] = {}
        self.target: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self._views: dict[int, Node] = {}
        self._dirs: dict[int, tuple[int, int]] = {}
        self._dblob = b""
        self._dstart = array("I", (0,))
        self._dino = array("I")
        self._dsorted = array("I")

    # --- lookups -------------------------------------------------------

    def __len__(self) -> int:
        return len(self.mode) - 1

    def regular_files(self) -> Iterator[tuple[int, int]]:
        """(data offset in the layer, size) of every regular file, each inode once."""
        mode, size, offset = self.mode, self.size, self.offset
        for ino in range(len(mode)):
            if mode[ino] & 0o170000 == 0o100000:
                yield offset[ino], size[ino]

    def valid(self, ino: int) -> bool:
        return 0 < ino < len(self.mode)

    def is_dir(self, ino: int) -> bool:
        return self.mode[ino] & _S_IFMT == _S_IFDIR

    def get(self, ino: int) -> Node:
        node = self._views.get(ino)
        if node is None:
            node = self._views[ino] = Node(self, ino)
        return node

    @property
    def root(self) -> Node:
        return self.get(ROOT_INO)

    def lookup_ino(self, parent: int, name: bytes) -> int:
        """The inode of `name` in directory `parent`, 0 if there is none (or `parent` is no directory)."""
        span = self._dirs.get(parent)
        if span is None:
            return 0
        lo, end = span
        hi = end
        srt, start, blob = self._dsorted, self._dstart, self._dblob
        while lo < hi:
            mid = (lo + hi) >> 1
            k = srt[mid]
            if blob[start[k]:start[k + 1]] < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < end:
            k = srt[lo]
            if blob[start[k]:start[k + 1]] == name:
                return self._dino[k]
        return 0

    def lookup(self, parent: int, name: bytes) -> Node | None:
        ino = self.lookup_ino(parent, name)
        return self.get(ino) if ino else None

    def resolve(self, path: str) -> Node | None:
        """The node at a path inside the layer (for tests and tools), without following symlinks."""
        ino = ROOT_INO
        for part in (p for p in path.encode("utf-8", "surrogateescape").split(b"/") if p and p != b"."):
            ino = self.lookup_ino(ino, part)
            if not ino:
                return None
        return self.get(ino)

    def entry_range(self, ino: int) -> tuple[int, int]:
        """[first, end) of a directory's entries for entry_at; empty for anything else."""
        return self._dirs.get(ino, (0, 0))

    def entry_at(self, k: int) -> tuple[bytes, int]:
        """(name, inode) of directory entry `k`; a directory's entries keep their order for its lifetime."""
        start = self._dstart
        return self._dblob[start[k]:start[k + 1]], self._dino[k]

    def listing(self, ino: int) -> list[tuple[bytes, int]]:
        """A directory's entries in a fixed order (tar order), so readdir offsets stay valid across calls."""
        lo, hi = self.entry_range(ino)
        return [self.entry_at(k) for k in range(lo, hi)]

    # --- building ------------------------------------------------------

    def _refuse(self, name: bytes, why: str) -> None:
        self.warnings += 1
        self.warn(f"refused tar entry {name.decode('utf-8', 'surrogateescape')!r}: {why}")

    def _build(self, entries: Iterable[codec.RawEntry]) -> None:
        # Hundreds of thousands of allocations and no cycles: collector passes would only slow the build.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._kids: dict[int, dict[bytes, int]] = {ROOT_INO: {}}
            # Directory path -> inode, so an entry finds its parent with one lookup instead of a walk.
            self._dir_cache: dict[bytes, int] = {b"": ROOT_INO}
            self._time_ids: dict[bytes, int] = {b"": 0}
            self._fill(entries)
            self._freeze()
            self._freeze_times()
        finally:
            for name in ("_kids", "_dir_cache", "_time_ids"):
                self.__dict__.pop(name, None)
            if collecting:
                gc.enable()

    def _fill(self, entries: Iterable[codec.RawEntry]) -> None:
        leading = _LEADING
        dir_cache = self._dir_cache
        kids = self._kids
        time_ids = self._time_ids
        type_bits = _TYPE_BITS
        modes, uids, gids, sizes, mtimes, offsets, nlinks, parents = (
            self.mode, self.uid, self.gid, self.size, self.mtime_id, self.offset, self.nlink, self.parent)
        archive_end = self.archive_end
        for entry in entries:
            name, typ, off, size, link, mode, uid, gid, mt, dmaj, dmin, pax = entry
            if name[:1] not in leading and b"/." not in name and b"//" not in name and b"\0" not in name:
                d, _, base = name.rstrip(b"/").rpartition(b"/")
                parent = dir_cache.get(d)
            else:
                parts = split_raw(name)
                if parts is None:
                    self._refuse(name, "name has a '..' component or a NUL byte")
                    continue
                if name[:1] == b"/":
                    self.warnings += 1
                    self.warn(f"tar entry {name.decode('utf-8', 'surrogateescape')!r}: absolute name taken "
                              f"relative to the layer root")
                if not parts:
                    if typ == DIR:
                        self._set_attrs(ROOT_INO, entry, _S_IFDIR)  # the archive's "./" entry
                    else:
                        self._refuse(name, "empty name")
                    continue
                d, base = b"/".join(parts[:-1]), parts[-1]
                parent = dir_cache.get(d)
            bits = type_bits.get(typ)
            if bits is None:
                if typ != HARDLINK:
                    self._refuse(name, f"unknown type {typ!r}")
                    continue
            elif bits == _S_IFREG and (off < 0 or size < 0 or off + size > archive_end):
                self._refuse(name, f"data range {off}+{size} runs past the archive end ({archive_end})")
                continue
            if parent is None:
                parent = self._dir_of(d)
                if parent is None:
                    self._refuse(name, "a parent is not a directory")
                    continue
            children = kids[parent]
            if base[:4] == WHITEOUT_PREFIX:
                if base == OPAQUE_MARKER:
                    self.xattrs.setdefault(parent, {})[OPAQUE_XATTR] = b"y"
                    continue
                if typ != HARDLINK:
                    self._add_whiteout(name, entry, parent, base[4:])
                    continue
            if bits is None:
                self._add_hardlink(name, link, parent, base)
                continue
            existing = children.get(base)
            if existing is not None:
                if bits == _S_IFDIR and modes[existing] & _S_IFMT == _S_IFDIR:
                    # tar keeps an existing directory (and its contents) and only updates its attributes.
                    self._set_attrs(existing, entry, _S_IFDIR)
                    continue
                self._unlink(parent, base)  # a later entry wins, as in tar
            ino = len(modes)
            modes.append(bits | (mode & _PERM_BITS))
            # Masks: hostile values must not stop the build (the format's fields are uint32 anyway).
            uids.append(uid & 0xFFFFFFFF)
            gids.append(gid & 0xFFFFFFFF)
            tid = time_ids.get(mt)
            if tid is None:
                tid = time_ids[mt] = len(time_ids)
            mtimes.append(tid)
            nlinks.append(1)
            parents.append(parent)
            if bits == _S_IFREG:
                sizes.append(size)
                offsets.append(off)
                self.total_size += size
            else:
                offsets.append(0)
                if bits == _S_IFDIR:
                    sizes.append(0)
                    kids[ino] = {}
                    dir_cache[d + b"/" + base if d else base] = ino
                elif bits == stat.S_IFLNK:
                    self.target[ino] = link
                    sizes.append(len(link))
                else:
                    sizes.append(0)
                    if bits in (stat.S_IFCHR, stat.S_IFBLK):
                        self.rdev[ino] = _makedev(dmaj, dmin)
            if pax:
                self._set_xattrs(ino, pax)
            children[base] = ino

    def _new(self, mode: int, parent: int) -> int:
        ino = len(self.mode)
        self.mode.append(mode)
        for col in (self.uid, self.gid, self.size, self.mtime_id, self.offset):
            col.append(0)
        self.nlink.append(1)
        self.parent.append(parent)
        if mode & _S_IFMT == _S_IFDIR:
            self._kids[ino] = {}
        return ino

    def _dir_of(self, path: bytes) -> int | None:
        """The directory at `path` (clean, no leading `/`), creating implied ones; None if a non-directory
        is in the way."""
        ino = ROOT_INO
        walked = b""
        for part in path.split(b"/"):
            walked = walked + b"/" + part if walked else part
            children = self._kids[ino]
            child = children.get(part)
            if child is None:
                child = self._new(_IMPLIED_DIR_MODE, ino)
                children[part] = child
            elif self.mode[child] & _S_IFMT != _S_IFDIR:
                return None
            ino = child
            self._dir_cache[walked] = ino
        return ino

    def _unlink(self, parent: int, name: bytes) -> None:
        old = self._kids[parent].pop(name, None)
        if old is None:
            return
        if self.mode[old] & _S_IFMT == _S_IFDIR:
            # Paths below the removed directory must no longer resolve to it; rare, so start over.
            self._dir_cache.clear()
            self._dir_cache[b""] = ROOT_INO
            return
        self.nlink[old] -= 1
        if self.nlink[old] <= 0:
            self.total_size -= self.size[old] if self.mode[old] & _S_IFMT == _S_IFREG else 0

    def _freeze_times(self) -> None:
        raws = list(self._time_ids)  # dicts keep insertion order: position = id
        self._tblob = b"".join(raws)
        self._tstart = array("I", accumulate(map(len, raws), initial=0))
        self._tns = array("q", bytes(8 * len(raws)))
        self._tdone = bytearray(len(raws))
        self._tdone[0] = 1

    def mtime_ns(self, ino: int) -> int:
        """The inode's modification time in nanoseconds (0 when the entry had none)."""
        tid = self.mtime_id[ino]
        if self._tdone[tid]:
            return self._tns[tid]
        ns = self._parse_time(ino, self._tblob[self._tstart[tid]:self._tstart[tid + 1]])
        self._tns[tid] = ns
        self._tdone[tid] = 1
        return ns

    def _parse_time(self, ino: int, raw: bytes) -> int:
        # Fast path for what Go writes (`2023-11-14T22:13:20[.123456789]Z`): the part up to the minute is
        # cached, since datetime parsing costs more than the rest.
        minutes = self._minutes
        ns: int | None = None
        m = _GO_TIME(raw)
        if m is not None:
            minute = minutes.get(m[1])
            if minute is None:
                try:
                    minute = parse_mod_time(m[1].decode("ascii") + ":00Z")[0]
                except ValueError:
                    minute = None
                else:
                    if len(minutes) < _MAX_CACHED_TIMES:
                        minutes[m[1]] = minute
            if minute is not None:
                frac = m[3]
                ns = (minute + int(m[2])) * 1_000_000_000 + (int(frac.ljust(9, b"0")) if frac else 0)
        if ns is None:
            text = raw.decode("utf-8", "surrogateescape")
            try:
                secs, nanos = parse_mod_time(text)
                ns = secs * 1_000_000_000 + nanos
            except ValueError:
                self.warnings += 1
                self.warn(f"inode {ino}: bad mod_time {text!r} in the zTOC, using 0")
                ns = 0
        # Years past 2262 (Go prints up to 9999) do not fit the kernel's signed 64-bit nanoseconds.
        return min(max(ns, _MIN_NS), _MAX_NS)

    def _set_xattrs(self, ino: int, pax: dict[str, bytes]) -> None:
        xattrs = None
        for k, v in pax.items():
            if k.startswith(_XATTR_PREFIX):
                if xattrs is None:
                    xattrs = {}
                xattrs[k[len(_XATTR_PREFIX):].encode("utf-8", "surrogateescape")] = v
        old = self.xattrs.get(ino)
        if self.mode[ino] & _S_IFMT == _S_IFDIR and old and OPAQUE_XATTR in old:
            # A directory entry after its own opaque marker keeps the marker.
            xattrs = dict(xattrs or {})
            xattrs[OPAQUE_XATTR] = old[OPAQUE_XATTR]
        if xattrs:
            self.xattrs[ino] = xattrs
        else:
            self.xattrs.pop(ino, None)

    def _set_attrs(self, ino: int, entry: codec.RawEntry, type_bits: int) -> None:
        name, _typ, _off, _size, _link, mode, uid, gid, mt, _dmaj, _dmin, pax = entry
        self.mode[ino] = type_bits | (mode & _PERM_BITS)
        self.uid[ino] = uid & 0xFFFFFFFF
        self.gid[ino] = gid & 0xFFFFFFFF
        time_ids = self._time_ids
        tid = time_ids.get(mt)
        if tid is None:
            tid = time_ids[mt] = len(time_ids)
        self.mtime_id[ino] = tid
        self._set_xattrs(ino, pax)

    def _add_whiteout(self, name: bytes, entry: codec.RawEntry, parent: int, hidden: bytes) -> None:
        if not hidden or hidden in (b".", b".."):
            self._refuse(name, "whiteout of nothing")
            return
        children = self._kids[parent]
        if hidden in children:
            self._unlink(parent, hidden)
        ino = self._new(stat.S_IFCHR, parent)
        self._set_attrs(ino, entry, stat.S_IFCHR)
        # overlayfs recognises a whiteout by type and device only; permission bits do not matter.
        children[hidden] = ino

    def _add_hardlink(self, name: bytes, link: bytes, parent: int, base: bytes) -> None:
        shown = link.decode("utf-8", "surrogateescape")
        target_parts = split_raw(link)
        if not target_parts:
            self._refuse(name, f"hardlink target {shown!r} is unusable")
            return
        ino = ROOT_INO
        for part in target_parts:
            children = self._kids.get(ino)
            found = children.get(part) if children is not None else None
            if found is None:
                self._refuse(name, f"hardlink target {shown!r} is missing")
                return
            ino = found
        if self.mode[ino] & _S_IFMT == _S_IFDIR:
            self._refuse(name, f"hardlink target {shown!r} is a directory")
            return
        children = self._kids[parent]
        if children.get(base) == ino:
            return  # linking a name to itself changes nothing
        if base in children:
            self._unlink(parent, base)
        children[base] = ino
        self.nlink[ino] += 1

    def _freeze(self) -> None:
        """Directory dicts -> one name blob and arrays; also sets directory link counts."""
        kids = self._kids
        nlink = self.nlink
        names: list[bytes] = []
        inos = array("I")
        order = array("I")
        dirs = {}
        # Every directory, and only directories, has an entry in kids: membership is the type test, and
        # map/sum and a C-level sort key keep the per-entry work out of the interpreter.
        is_dir = kids.__contains__
        by_name = names.__getitem__
        for ino in sorted(kids):
            children = kids[ino]
            lo = len(inos)
            names += children
            inos.extend(children.values())
            # A directory's link count is 2 plus one per subdirectory ("." and each child's "..").
            nlink[ino] = 2 + sum(map(is_dir, children.values()))
            hi = len(inos)
            dirs[ino] = (lo, hi)
            order.extend(sorted(range(lo, hi), key=by_name))
        self._dblob = b"".join(names)
        self._dstart = array("I", accumulate(map(len, names), initial=0))
        self._dino = inos
        self._dsorted = order
        self._dirs = dirs
