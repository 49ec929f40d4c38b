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
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock
from filelock import Timeout as LockTimeout

from .. import digest as dg
from ..config import Config
from ..errors import StoreError

try:
    # The same CRC-32 as zlib's, about 4x faster: every cache hit checks a whole span with it.
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; stdlib zlib keeps the cache working
    from zlib import crc32 as _crc32

log = logging.getLogger(__name__)

# magic, uncompressed start offset, payload length, crc32 of the payload; padded to 32 bytes.
_HEADER = struct.Struct("<8sQQI4x")
HEADER_SIZE = _HEADER.size
_MAGIC = b"SOCISPN1"
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


class SpanCacheLockTimeout(StoreError):
    """Another process held a span's lock for longer than the caller was willing to wait."""


class SpanCache:
    """Uncompressed spans at ROOT/spans/sha256/<layer hex>/<start>-<length>.span.

    An entry is keyed by (layer digest, uncompressed start, uncompressed length): the bytes of a
    layer's uncompressed tar at an offset are fixed by the layer digest alone, whatever zTOC (span
    size, checkpoint placement, build tool) mapped them, so indexes of the same layer share entries
    and can never collide. The compressed span digest would not do: a span's inflated bytes also
    depend on its window and bit offset, which the compressed bytes alone do not fix.

    Each file holds a 32-byte header (magic, start, length, crc32) and the payload. Writers use a
    temp file and rename; readers check size and crc32, and drop a damaged entry instead of serving
    it. Recency is the file's mtime (touched on hits); the writer that crosses the size budget or
    the free-space floor evicts oldest-first under an inter-process lock.
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

    # -- paths and locks -------------------------------------------------

    def _layer_dir(self, layer: str) -> Path:
        return self.dir / "sha256" / dg.hex_part(dg.validate(layer))

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

    def get(self, layer: str, start: int, length: int) -> bytes | None:
        """The entry's payload, or None if absent or damaged (a damaged entry is removed)."""
        p = self.path(layer, start, length)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("span cache: cannot open %s: %s", p.name, exc.strerror or exc)
            return None
        try:
            st = os.fstat(fd)
            if st.st_size != HEADER_SIZE + length:
                why = f"size {st.st_size}, expected {HEADER_SIZE + length}"
                data = None
            else:
                magic, h_start, h_len, h_crc = _HEADER.unpack(os.pread(fd, HEADER_SIZE, 0))
                data = os.pread(fd, length, HEADER_SIZE) if length else b""
                if magic != _MAGIC or h_start != start or h_len != length:
                    why, data = "bad header", None
                elif len(data) != length:
                    why, data = "short read", None
                elif _crc32(data) != h_crc:
                    why, data = "checksum mismatch", None
        except OSError as exc:
            log.warning("span cache: cannot read %s: %s", p.name, exc.strerror or exc)
            return None
        finally:
            os.close(fd)
        if data is None:
            log.warning("span cache: dropping damaged entry %s/%s (%s)", p.parent.name[:12], p.name, why)
            with contextlib.suppress(OSError):
                os.unlink(p)
            return None
        now = time.time()
        if st.st_mtime < now - _TOUCH_GRANULARITY:
            with contextlib.suppress(OSError):
                os.utime(p)
        return data

    # -- writes ------------------------------------------------------------

    def put(self, layer: str, start: int, data: bytes | bytearray | memoryview) -> bool:
        """Store one entry (replacing any). False if it could not be cached (disk full, I/O error):
        the caller still has the bytes and serves them."""
        length = len(data)
        need = HEADER_SIZE + length
        if need > self.max_size:
            return False
        try:
            d = self._ensure_dir(layer)
        except OSError as exc:
            self._log_once(exc.strerror or str(exc))
            return False
        if not self._make_room(need):
            self._log_once(f"the disk holding {self.dir} is below {self.min_free_percent}% free")
            return False
        for attempt in range(2):
            try:
                self._write(d, start, data)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT) and attempt == 0:
                    self._make_room(need, disk_full=True)
                    continue
                if exc.errno == errno.ENOENT and attempt == 0:
                    # Someone removed the cache directory under us: recreate it once.
                    self._made_dirs.clear()
                    with contextlib.suppress(OSError):
                        d = self._ensure_dir(layer)
                    continue
                self._log_once(exc.strerror or str(exc))
                return False
            with self._mu:
                if self._usage is not None:
                    self._usage += need
            return True
        return False

    def _write(self, d: Path, start: int, data: bytes | bytearray | memoryview) -> None:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                f.write(_HEADER.pack(_MAGIC, start, len(data), _crc32(data)))
                mv = memoryview(data)
                while mv:
                    n = f.write(mv)
                    mv = mv[n:]
            # No fsync: after a crash a torn entry fails its size or checksum check and is refetched.
            os.replace(tmp, d / f"{start}-{len(data)}{_SUFFIX}")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

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
