"""SpanCache: the on-disk cache of uncompressed spans shared by every layer server and process."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from filelock import Timeout as LockTimeout

from .. import digest as dg
from ..config import Config
from ..errors import StoreError

try:
    # The same CRC-32 as zlib's, about 4x faster: every byte read from the cache is checked with it.
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; stdlib zlib keeps the cache working
    from zlib import crc32 as _crc32

log = logging.getLogger(__name__)

# magic, uncompressed start offset, payload length, check block size; padded to 32 bytes. Then one crc32
# per block of the payload, then the payload.
_HEADER = struct.Struct("<8sQQI4x")
HEADER_SIZE = _HEADER.size
_MAGIC = b"SOCISPN2"
# Reads are checked block by block, so a read of a few pages checks (and reads) a few blocks, not the span:
# the cache can serve a FUSE read straight from the file instead of the server keeping spans in memory.
BLOCK = 32 << 10
_SUFFIX = ".span"
_LOCK_SUFFIX = ".lock"
_TMP_PREFIX = ".tmp-"
# A hit refreshes the entry's mtime (its LRU age) at most this often: one utime per span, not per read.
_TOUCH_GRANULARITY = 1.0
# Other processes write too; our running total is re-measured from disk at least this often while writing.
_RESCAN_INTERVAL = 30.0
# Eviction frees down to this share of max_size, so a full cache does not evict on every write.
_LOW_WATER = 0.9
# Temp files older than this are leftovers of a killed writer.
_STALE_TMP = 3600.0
# Entries kept open (descriptor and block checksums) for the next read of the same span.
OPEN_ENTRIES = 32


def _blocks(length: int) -> int:
    return -(-length // BLOCK)


def payload_offset(length: int) -> int:
    """Where an entry's payload starts: after the header and its block checksums."""
    return HEADER_SIZE + 4 * _blocks(length)


def entry_size(length: int) -> int:
    """Bytes on disk of an entry with a payload of `length` bytes."""
    return payload_offset(length) + length


class SpanCacheLockTimeout(StoreError):
    """Another process held a span's lock for longer than the caller was willing to wait."""


class _Damaged(Exception):
    """An entry failed a check; the message says which."""


class _Open:
    """One entry's open descriptor and block checksums, shared by concurrent readers (refs)."""

    __slots__ = ("path", "fd", "length", "crcs", "base", "refs", "dropped", "touched")

    def __init__(self, path: Path, fd: int, length: int, crcs: tuple[int, ...], touched: float) -> None:
        self.path = path
        self.fd = fd
        self.length = length
        self.crcs = crcs
        self.base = payload_offset(length)
        self.refs = 0
        self.dropped = False
        self.touched = touched


def _read_table(fd: int, start: int, length: int) -> tuple[tuple[int, ...], float]:
    """Check an entry's size and header; its block checksums and mtime. Raises _Damaged (or OSError)."""
    st = os.fstat(fd)
    if st.st_size != entry_size(length):
        raise _Damaged(f"size {st.st_size}, expected {entry_size(length)}")
    head = os.pread(fd, payload_offset(length), 0)
    if len(head) != payload_offset(length):
        raise _Damaged("short read")
    magic, h_start, h_len, h_block = _HEADER.unpack_from(head)
    if magic != _MAGIC or h_start != start or h_len != length or h_block != BLOCK:
        raise _Damaged("bad header")
    return struct.unpack_from(f"<{_blocks(length)}I", head, HEADER_SIZE), st.st_mtime


class EntryWriter:
    """Writes one entry from consecutive chunks (an inflating span) without holding it whole.

    Failures (disk full, I/O errors) are remembered, not raised: `commit` then returns False and the
    caller serves the span from memory. Use through SpanCache.writer."""

    def __init__(self, cache: SpanCache, layer: str, start: int, length: int) -> None:
        self.cache = cache
        self.layer = layer
        self.start = start
        self.length = length
        self.written = 0
        self.failed: str | None = None
        self.errno = 0
        self._crcs: list[int] = []
        self._crc = 0
        self._fd = -1
        self._tmp = ""
        try:
            self._dir = cache._ensure_dir(layer)
            self._fd, self._tmp = tempfile.mkstemp(dir=self._dir, prefix=_TMP_PREFIX)
            # The table is written last; the payload goes to its final place from the start.
            os.lseek(self._fd, payload_offset(length), os.SEEK_SET)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.failed = exc.strerror or str(exc)
        self.errno = exc.errno or 0
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self.cache._make_room(entry_size(self.length), disk_full=True)
        self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.failed is not None:
            return
        mv = memoryview(data).cast("B")
        if self.written + len(mv) > self.length:
            self.failed = f"{self.written + len(mv)} bytes for an entry of {self.length}"
            self.abort()
            return
        # Checksums per BLOCK of the payload, whatever the chunk boundaries.
        pos = self.written
        k = 0
        while k < len(mv):
            take = min(len(mv) - k, BLOCK - pos % BLOCK)
            self._crc = _crc32(mv[k:k + take], self._crc)
            k += take
            pos += take
            if pos % BLOCK == 0:
                self._crcs.append(self._crc)
                self._crc = 0
        try:
            self._write_all(mv)
        except OSError as exc:
            self._fail(exc)
            return
        self.written = pos

    def _write_all(self, mv: memoryview) -> None:
        while mv:
            n = os.write(self._fd, mv)
            mv = mv[n:]

    def commit(self) -> bool:
        """Put the entry in place (True), or drop it if anything failed or it is incomplete (False)."""
        if self.failed is None and self.written != self.length:
            self.failed = f"{self.written} of {self.length} bytes written"
        if self.failed is not None:
            self.abort()
            self.cache._log_once(self.failed)
            return False
        crcs = self._crcs + ([self._crc] if self.length % BLOCK else [])
        head = _HEADER.pack(_MAGIC, self.start, self.length, BLOCK) + struct.pack(f"<{len(crcs)}I", *crcs)
        try:
            if os.pwrite(self._fd, head, 0) != len(head):
                raise OSError(errno.EIO, "short write")
            # No fsync: after a crash a torn entry fails its size or checksum check and is refetched.
            path = self._dir / f"{self.start}-{self.length}{_SUFFIX}"
            os.replace(self._tmp, path)
            self._tmp = ""
        except OSError as exc:
            self._fail(exc)
            self.cache._log_once(self.failed or "write failed")
            return False
        self.cache._adopt(path, self._fd, self.length, tuple(crcs))
        self._fd = -1
        return True

    def abort(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = ""


class SpanCache:
    """Uncompressed spans at ROOT/spans/sha256/<layer hex>/<start>-<length>.span.

    An entry is keyed by (layer digest, uncompressed start, uncompressed length): the bytes of a
    layer's uncompressed tar at an offset are fixed by the layer digest alone, whatever zTOC (span
    size, checkpoint placement, build tool) mapped them, so indexes of the same layer share entries
    and can never collide. The compressed span digest would not do: a span's inflated bytes also
    depend on its window and bit offset, which the compressed bytes alone do not fix.

    Each file holds a 32-byte header (magic, start, length, block size), a crc32 per 32 KiB block of
    the payload, and the payload. Writers use a temp file and rename; readers check the size and
    header, and the checksum of every block they read, and drop a damaged entry instead of serving
    it. Recently used entries stay open (OPEN_ENTRIES), so a read is one pread. Recency is the file's
    mtime (touched on hits); the writer that crosses the size budget or the free-space floor evicts
    oldest-first under an inter-process lock.
    """

    def __init__(self, root: str | os.PathLike[str], config: Config | None = None, *,
                 max_size: int | None = None, min_free_percent: int | None = None) -> None:
        cfg = (config or Config()).cache
        self.root = Path(root)
        self.dir = self.root / "spans"
        self.max_size = cfg.max_size if max_size is None else max_size
        self.min_free_percent = cfg.min_free_percent if min_free_percent is None else min_free_percent
        if self.max_size < 0 or not 0 <= self.min_free_percent < 100:
            raise StoreError(f"span cache: bad budget max_size={self.max_size} "
                             f"min_free_percent={self.min_free_percent}")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"span cache: cannot create {self.dir}: {exc.strerror or exc}") from exc
        self._mu = threading.Lock()
        self._usage: int | None = None  # bytes on disk as last measured plus our writes since
        self._scanned_at = 0.0
        self._write_failure_logged = False
        self._made_dirs: set[str] = set()
        self._open_mu = threading.Lock()
        self._open: OrderedDict[Path, _Open] = OrderedDict()
        self._layer_dirs: dict[str, Path] = {}

    # -- paths and locks -------------------------------------------------

    def _layer_dir(self, layer: str) -> Path:
        # Every read names its entry: validate each layer digest once, not once per read.
        d = self._layer_dirs.get(layer)
        if d is None:
            d = self._layer_dirs[layer] = self.dir / "sha256" / dg.hex_part(dg.validate(layer))
        return d

    def path(self, layer: str, start: int, length: int) -> Path:
        return self._layer_dir(layer) / f"{start}-{length}{_SUFFIX}"

    def _ensure_dir(self, layer: str) -> Path:
        d = self._layer_dir(layer)
        key = str(d)
        if key not in self._made_dirs:
            d.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(key)
        return d

    @contextlib.contextmanager
    def span_lock(self, layer: str, start: int, length: int, timeout: float) -> Iterator[None]:
        """Hold the inter-process lock of one entry (flock: separate holders exclude each other even
        within one process). Raises SpanCacheLockTimeout after `timeout` seconds."""
        d = self._ensure_dir(layer)
        lock = FileLock(str(d / f"{start}-{length}{_LOCK_SUFFIX}"), timeout=max(timeout, 0.0), poll_interval=0.005,
                        thread_local=False)
        try:
            lock.acquire()
        except LockTimeout:
            raise SpanCacheLockTimeout(f"span cache: span {layer}@{start} stayed locked for {timeout:.1f}s") from None
        try:
            yield
        finally:
            lock.release()

    # -- reads -------------------------------------------------------------

    def has(self, layer: str, start: int, length: int) -> bool:
        return self.path(layer, start, length).is_file()

    def is_open(self, layer: str, start: int, length: int) -> bool:
        """True if the entry is among the open ones: a read of it is one pread of a recently used file."""
        p = self.path(layer, start, length)
        with self._open_mu:
            return p in self._open

    def get(self, layer: str, start: int, length: int) -> bytes | None:
        """The entry's whole payload, or None if absent or damaged (a damaged entry is removed)."""
        data = self.read(layer, start, length, 0, length)
        return None if data is None else bytes(data)

    def read(self, layer: str, start: int, length: int, offset: int, size: int) -> bytes | memoryview | None:
        """Payload bytes [offset, offset+size) of an entry, every block they touch checked first.

        None if the entry is absent or damaged (a damaged entry is removed). A view when the read does
        not cover whole blocks: the caller hands it on without another copy."""
        if offset < 0 or size < 0 or offset + size > length:
            raise ValueError(f"span cache: read {offset}+{size} outside an entry of {length} bytes")
        ent = self._acquire(self.path(layer, start, length), start, length)
        if ent is None:
            return None
        try:
            if size == 0:
                return b""
            first, last = offset // BLOCK, (offset + size - 1) // BLOCK
            lo, hi = first * BLOCK, min(length, (last + 1) * BLOCK)
            buf = os.pread(ent.fd, hi - lo, ent.base + lo)
            if len(buf) != hi - lo:
                raise _Damaged("short read")
            mv = memoryview(buf)
            for k in range(first, last + 1):
                a = (k - first) * BLOCK
                if _crc32(mv[a:a + BLOCK]) != ent.crcs[k]:
                    raise _Damaged(f"checksum mismatch in block {k}")
            now = time.time()
            if now - ent.touched > _TOUCH_GRANULARITY:
                ent.touched = now
                with contextlib.suppress(OSError):
                    os.utime(ent.path)
        except _Damaged as exc:
            self._drop(ent, str(exc))
            return None
        except OSError as exc:
            log.warning("span cache: cannot read %s: %s", ent.path.name, exc.strerror or exc)
            return None
        finally:
            self._release(ent)
        return buf if lo == offset and hi - lo == size else mv[offset - lo:offset - lo + size]

    def _acquire(self, p: Path, start: int, length: int) -> _Open | None:
        with self._open_mu:
            ent = self._open.get(p)
            if ent is not None:
                ent.refs += 1
                self._open.move_to_end(p)
                return ent
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("span cache: cannot open %s: %s", p.name, exc.strerror or exc)
            return None
        try:
            crcs, touched = _read_table(fd, start, length)
        except _Damaged as exc:
            self._remove_damaged(p, fd, str(exc))
            os.close(fd)
            return None
        except OSError as exc:  # an I/O error is not proof of damage: leave the entry
            log.warning("span cache: cannot read %s: %s", p.name, exc.strerror or exc)
            os.close(fd)
            return None
        ent = _Open(p, fd, length, crcs, touched)
        ent.refs = 1
        self._insert(ent)
        return ent

    @staticmethod
    def _retire(ent: _Open) -> None:
        """Hold _open_mu. `ent` is out of the table: close it now, or its last reader will (_release)."""
        ent.dropped = True
        if ent.refs == 0 and ent.fd >= 0:
            ent.fd, fd = -1, ent.fd
            os.close(fd)

    def _insert(self, ent: _Open) -> None:
        """Make `ent` the open entry of its path (retiring the one it replaces and the least recently used)."""
        with self._open_mu:
            old = self._open.pop(ent.path, None)
            if old is not None:
                self._retire(old)
            self._open[ent.path] = ent
            while len(self._open) > OPEN_ENTRIES:
                self._retire(self._open.popitem(last=False)[1])

    def _release(self, ent: _Open) -> None:
        with self._open_mu:
            ent.refs -= 1
            if ent.dropped:
                self._retire(ent)

    def _forget(self, p: Path) -> None:
        """Close an entry removed from disk (eviction), once its readers are done."""
        with self._open_mu:
            ent = self._open.pop(p, None)
            if ent is not None:
                self._retire(ent)

    def _drop(self, ent: _Open, why: str) -> None:
        with self._open_mu:
            if self._open.get(ent.path) is ent:
                del self._open[ent.path]
            self._retire(ent)  # the caller still reads it: closed in its _release
            fd = ent.fd
        self._remove_damaged(ent.path, fd, why)

    def _remove_damaged(self, p: Path, fd: int, why: str) -> None:
        log.warning("span cache: dropping damaged entry %s/%s (%s)", p.parent.name[:12], p.name, why)
        with contextlib.suppress(OSError):
            # Only the damaged file: another writer may have renamed a good entry into place since.
            if fd < 0 or os.stat(p).st_ino == os.fstat(fd).st_ino:
                os.unlink(p)

    def close(self) -> None:
        """Close the open entries (readers in progress finish first)."""
        with self._open_mu:
            for ent in self._open.values():
                self._retire(ent)
            self._open.clear()

    # -- writes ------------------------------------------------------------

    def writer(self, layer: str, start: int, length: int) -> EntryWriter | None:
        """A writer for one entry, or None if the budget or the free-space floor leaves no room for it."""
        need = entry_size(length)
        if need > self.max_size:
            return None
        try:
            self._ensure_dir(layer)
        except OSError as exc:
            self._log_once(exc.strerror or str(exc))
            return None
        if not self._make_room(need):
            self._log_once(f"the disk holding {self.dir} is below {self.min_free_percent}% free")
            return None
        w = EntryWriter(self, layer, start, length)
        if w.errno == errno.ENOENT:
            # Someone removed the cache directory under us: recreate it once.
            self._made_dirs.clear()
            w = EntryWriter(self, layer, start, length)
        return w

    def put(self, layer: str, start: int, data: bytes | bytearray | memoryview) -> bool:
        """Store one entry (replacing any). False if it could not be cached (disk full, I/O error):
        the caller still has the bytes and serves them."""
        for attempt in range(2):
            w = self.writer(layer, start, len(data))
            if w is None:
                return False
            w.write(data)
            if w.commit():
                return True
            # A full disk: the failed write evicted (EntryWriter._fail); one more try.
            if attempt or w.errno not in (errno.ENOSPC, errno.EDQUOT):
                return False
        return False

    def _adopt(self, p: Path, fd: int, length: int, crcs: tuple[int, ...]) -> None:
        """A committed entry: count it, and keep its descriptor open for the reads that follow."""
        with self._mu:
            if self._usage is not None:
                self._usage += entry_size(length)
        self._insert(_Open(p, fd, length, crcs, time.time()))

    def _log_once(self, why: str) -> None:
        # A full disk would otherwise log once per span read.
        if not self._write_failure_logged:
            self._write_failure_logged = True
            log.warning("span cache: cannot cache spans in %s (%s); serving them uncached", self.dir, why)

    # -- budget and eviction ------------------------------------------------

    def _disk_shortfall(self, need: int) -> int:
        """Bytes that must be freed so that writing `need` bytes keeps min_free_percent free."""
        try:
            st = os.statvfs(self.dir)
        except OSError:
            return 0
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        floor = total * self.min_free_percent // 100
        return max(0, floor + need - free)

    def _make_room(self, need: int, disk_full: bool = False) -> bool:
        """Evict if this write would cross a budget; False if the free-space floor still cannot be kept."""
        now = time.monotonic()
        with self._mu:
            stale = self._usage is None or now - self._scanned_at > _RESCAN_INTERVAL
            over = self._usage is not None and self._usage + need > self.max_size
        shortfall = self._disk_shortfall(need)
        if disk_full:
            shortfall = max(shortfall, 2 * need)
        if not (stale or over or shortfall):
            return True
        self.evict(need=need, extra=shortfall)
        return not shortfall or self._disk_shortfall(need) == 0

    def scan(self) -> list[tuple[float, int, Path]]:
        """Every entry as (mtime, size on disk, path); also removes leftover temp files."""
        out: list[tuple[float, int, Path]] = []
        base = self.dir / "sha256"
        if not base.is_dir():
            return out
        now = time.time()
        for layer_dir in os.scandir(base):
            if not layer_dir.is_dir(follow_symlinks=False):
                continue
            try:
                it = list(os.scandir(layer_dir.path))
            except OSError:
                continue
            names = {e.name for e in it}
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if e.name.endswith(_SUFFIX):
                    out.append((st.st_mtime, st.st_size, Path(e.path)))
                elif st.st_mtime >= now - _STALE_TMP:
                    continue
                elif e.name.startswith(_TMP_PREFIX) or (
                        # The lock of an evicted entry nobody touched for long: keep the inode count bounded.
                        e.name.endswith(_LOCK_SUFFIX) and e.name[:-len(_LOCK_SUFFIX)] + _SUFFIX not in names):
                    with contextlib.suppress(OSError):
                        os.unlink(e.path)
        return out

    def usage(self) -> int:
        """Bytes held by entries right now (measured on disk)."""
        return sum(size for _, size, _ in self.scan())

    def evict(self, need: int = 0, extra: int = 0) -> int:
        """Remove oldest entries until `need` more bytes fit within max_size (down to the low-water
        mark when over it) and `extra` bytes were freed. Returns the bytes removed."""
        lock = FileLock(str(self.dir / "evict.lock"), timeout=10, thread_local=False)
        try:
            lock.acquire()
        except LockTimeout:
            return 0  # another process is evicting right now; it makes room for us too
        try:
            entries = self.scan()
            total = sum(size for _, size, _ in entries)
            limit = self.max_size - need
            if total > limit:
                limit = min(limit, int(self.max_size * _LOW_WATER))
            freed = 0
            removed = 0
            entries.sort(key=lambda e: e[0])
            for _, size, p in entries:
                if total <= limit and freed >= extra:
                    break
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                self._forget(p)
                total -= size
                freed += size
                removed += 1
            if removed:
                log.info("span cache: evicted %d entries (%d bytes), %d bytes remain", removed, freed, total)
            with self._mu:
                self._usage = total
                self._scanned_at = time.monotonic()
            return freed
        finally:
            lock.release()
