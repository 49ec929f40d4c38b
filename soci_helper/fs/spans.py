"""SpanManager: serves uncompressed layer bytes span by span (fetch, verify, inflate, cache) for one mount."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from .. import digest as dg
from ..config import BlobConfig, Config
from ..errors import SociError
from ..store.spancache import SpanCache
from ..ztoc.extract import extract_span, inflate_span_into
from ..ztoc.model import REG, Ztoc
from ..ztoc.reader import parse_zinfo
from ..ztoc.zinfo import spans_of
from .stats import MountStats

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], bytes]
FetchMany = Callable[[list[tuple[int, int]]], list[bytes]]

# Reads landing this close to where the previous read ended still count as sequential: the
# kernel issues FUSE reads of one stream concurrently, so they arrive slightly out of order.
_SEQ_SLACK = 1 << 20
_RETRY_FIRST_WAIT = 0.05
_RETRY_MAX_WAIT = 1.0


class SpanFetchError(SociError):
    """A read cannot be served: the registry failed or timed out, or span bytes never verified (EIO)."""


class _Claim:
    """One span being loaded by this manager; `deadline` lets a later reader replace a stuck claim."""

    __slots__ = ("future", "deadline")

    def __init__(self, deadline: float) -> None:
        self.future: Future[bytes] = Future()
        self.deadline = deadline


class SpanManager:
    """Reads of one layer's uncompressed bytes, fetched lazily span by span.

    `fetch(offset, length)` returns exactly `length` bytes of the compressed blob at `offset`;
    `fetch_many(ranges)` (optional) fetches several (offset, length) ranges, merging adjacent ones
    into one request. Spans are verified against the zTOC's span digests, inflated from their
    checkpoints straight into the shared on-disk `cache`, and read back from it range by range (the
    cache checks every block it returns): the server holds no inflated span in memory, except the few
    the cache refused (disk full), kept so that they are served all the same.

    Concurrency: a span is loaded once per manager (claims with futures), once per cache across
    managers and processes (the cache's per-span file lock, with a re-check after taking it).
    Fetching runs on a small thread pool, so a reader can always give up at its deadline.

    Counters: `cache_hits` counts spans a read found in the on-disk cache (once per read and span),
    `cache_misses` spans that had to be fetched; `bytes_fetched` counts compressed bytes received,
    retries included; `bytes_served` counts what `read` returned.
    """

    # Tunables, small on purpose: a layer server may serve many mounts on two cores.
    WORKERS = 3
    READAHEAD_SPANS = 3
    # Spans the on-disk cache refused (disk full) are kept in memory instead: the one being read and the
    # previous one (a read crossing a span boundary). Inflated spans are 4 MiB each.
    MEMORY_SPANS = 2
    # Spans are inflated to the cache through a buffer of this size per thread, never whole in memory.
    INFLATE_CHUNK = 256 << 10
    MAX_MERGE_SPANS = 8
    # Threads of their own for the heads of big files, so that demand reads never queue behind them.
    HEAD_THREADS = 2
    # A prefetch artifact's spans: requests in flight at once, and consecutive spans per request.
    PREFETCH_THREADS = 3
    PREFETCH_MERGE = 2

    stats: MountStats

    def __init__(self, ztoc: Ztoc, layer_digest: str, fetch: Fetch, cache: SpanCache,
                 config: Config | None = None, fetch_many: FetchMany | None = None) -> None:
        self.config = config or Config()
        self.ztoc = ztoc
        self.layer = dg.validate(layer_digest)
        self.zinfo = parse_zinfo(ztoc)
        n = self.zinfo.num_spans
        if n != len(ztoc.span_digests):
            raise SpanFetchError(f"{self.layer}: zTOC has {len(ztoc.span_digests)} span digests for {n} spans")
        self.num_spans = n
        self._u_start: list[int] = []
        self._u_end: list[int] = []
        self._c_start: list[int] = []
        self._c_end: list[int] = []
        for i in range(n):
            us, ue = self.zinfo.uncompressed_range(i)
            cs, ce = self.zinfo.compressed_range(i)
            assert ue is not None and ce is not None  # parse_zinfo always passes both sizes
            self._u_start.append(us)
            self._u_end.append(ue)
            self._c_start.append(cs)
            self._c_end.append(ce)
        self.size = self._u_end[-1] if n else 0
        self.fetch = fetch
        self.fetch_many = fetch_many
        self.cache = cache
        # A zero or negative bound would fail every uncached read at once; fall back to the default.
        self.timeout = float(self.config.blob.fetching_timeout_sec
                             if self.config.blob.fetching_timeout_sec > 0 else BlobConfig.fetching_timeout_sec)
        self.retries = max(0, self.config.blob.max_span_verification_retries)
        self.stats = MountStats()
        self._mu = threading.Lock()
        self._claims: dict[int, _Claim] = {}
        self._mem: OrderedDict[int, bytes] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=self.WORKERS, thread_name_prefix="soci-span")
        self._closed = False
        self._last_start = -1
        self._next_seq = -1
        self._seq_run = 0
        self.last_activity = time.monotonic()
        self._background: object | None = None
        self._prefetching = False
        self._local = threading.local()

    # -- geometry ------------------------------------------------------------

    def span_range(self, span_id: int) -> tuple[int, int]:
        """[start, end) of a span in the uncompressed layer."""
        return self._u_start[span_id], self._u_end[span_id]

    def spans_of(self, offset: int, length: int) -> range:
        """The span ids holding uncompressed bytes [offset, offset+length), clamped to the layer."""
        return spans_of(self.zinfo, offset, length)

    def _on_disk(self, span_id: int) -> bool:
        us = self._u_start[span_id]
        return self.cache.has(self.layer, us, self._u_end[span_id] - us)

    def is_cached(self, span_id: int) -> bool:
        """True if the span is in the on-disk cache (what background fetch fills)."""
        return self._on_disk(span_id)

    # -- the read path -------------------------------------------------------

    def ready(self, offset: int, length: int) -> bool:
        """True if read(offset, length) would be served at once: from spans kept in memory or from cache
        entries in use (one pread of a file just read or written), never waiting for the network."""
        ids = self.spans_of(offset, length)
        if not ids:
            return False
        for sid in ids:
            with self._mu:
                if sid in self._mem:
                    continue
            us = self._u_start[sid]
            if not self.cache.is_open(self.layer, us, self._u_end[sid] - us):
                return False
        return True

    def read(self, offset: int, length: int, ahead_limit: int | None = None) -> bytes:
        """Blocking, thread-safe: `length` uncompressed bytes at `offset` (fewer at the layer's end).

        A sequential reader gets the following spans fetched ahead, up to `ahead_limit` (the end of the file
        being read) when given. Raises SpanFetchError when the bytes cannot be served within
        blob.fetching_timeout_sec."""
        return bytes(self.read_buffer(offset, length, ahead_limit))

    def read_buffer(self, offset: int, length: int, ahead_limit: int | None = None) -> bytes | memoryview:
        """Like read(), but a read inside one span may be a view, not a copy: for a caller that only
        hands the bytes on (the FUSE reply), this saves copying every byte served once more."""
        if self._closed:
            raise SpanFetchError(f"{self.layer}: the mount is closed")
        if offset < 0 or length < 0:
            raise SpanFetchError(f"{self.layer}: invalid read {offset}+{length}")
        self.note_activity()
        ids = self.spans_of(offset, length)
        if not ids:
            return b""
        end = min(offset + length, self.size)
        deadline = time.monotonic() + self.timeout
        parts: list[bytes | memoryview | None] = []
        hits = 0
        for sid in ids:
            part, from_disk = self._stored(sid, offset, end)
            parts.append(part)
            hits += from_disk
        missing = [sid for sid, part in zip(ids, parts, strict=True) if part is None]
        t0 = time.monotonic() if missing else 0.0
        got = self._request(missing, deadline, remember=True) if missing else {}
        self._maybe_read_ahead(offset, end, ids[-1], deadline, ahead_limit)
        for k, sid in enumerate(ids):
            if parts[k] is None:
                parts[k] = self._loaded(sid, got[sid], offset, end, deadline)
        out = parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[arg-type]
        assert out is not None
        if missing:
            self.stats.add(bytes_served=len(out), cache_hits=hits, read_wait_us=int((time.monotonic() - t0) * 1e6))
        else:
            self.stats.add(bytes_served=len(out), cache_hits=hits)
        return out

    def _slice(self, sid: int, offset: int, end: int) -> tuple[int, int]:
        """[lo, hi) of span `sid` that the read [offset, end) covers."""
        us = self._u_start[sid]
        return max(offset, us) - us, min(end, self._u_end[sid]) - us

    def _part(self, data: bytes, sid: int, offset: int, end: int) -> bytes | memoryview:
        """The part of [offset, end) in span `sid`, given its bytes: a view unless that is all of them."""
        lo, hi = self._slice(sid, offset, end)
        return data if lo == 0 and hi == len(data) else memoryview(data)[lo:hi]

    def _stored(self, sid: int, offset: int, end: int) -> tuple[bytes | memoryview | None, bool]:
        """The part of [offset, end) in span `sid` if it is at hand (memory or the on-disk cache), and
        whether it came from the disk."""
        with self._mu:
            data = self._mem.get(sid)
            if data is not None:
                self._mem.move_to_end(sid)
        if data is not None:
            return self._part(data, sid, offset, end), False
        lo, hi = self._slice(sid, offset, end)
        us = self._u_start[sid]
        part = self.cache.read(self.layer, us, self._u_end[sid] - us, lo, hi - lo)
        return part, part is not None

    def _loaded(self, sid: int, item: bytes | _Claim, offset: int, end: int, deadline: float) -> bytes | memoryview:
        """The part of [offset, end) in span `sid` once its load (`item`) is done."""
        data = self._wait(sid, item, deadline)
        if data is None:
            part = self._stored(sid, offset, end)[0]
            if part is not None:
                return part
            # Gone from the disk since it was loaded (evicted by a tight budget, or damaged): load it once
            # more, into memory this time (a load to memory always settles with the bytes).
            data = self._wait(sid, self._request([sid], deadline, remember=True, to_memory=True)[sid], deadline)
            if data is None:
                raise SpanFetchError(f"{self.layer}: span {sid} could not be loaded into memory")
        return self._part(data, sid, offset, end)

    def _maybe_read_ahead(self, offset: int, end: int, last: int, deadline: float, limit: int | None) -> None:
        with self._mu:
            # Forward progress near where the last read ended; re-reading the same bytes is not.
            sequential = 0 <= self._last_start < offset and abs(offset - self._next_seq) <= _SEQ_SLACK
            self._seq_run = self._seq_run + 1 if sequential else 0
            self._last_start = offset
            self._next_seq = end
            run = self._seq_run
        if run < 1 or self.READAHEAD_SPANS <= 0:
            return
        stop = min(last + 1 + self.READAHEAD_SPANS, self.num_spans)
        if limit is not None:
            # Not past the file being read: the next files in the layer are rarely the next ones opened, and
            # spans fetched for them were 40% of what a Python start-up fetched with 4 MiB spans.
            last_byte = min(limit, self.size) - 1
            stop = min(stop, self.zinfo.span_of(last_byte) + 1) if last_byte >= 0 else 0
        ahead = range(last + 1, stop)
        if ahead:
            # One task per span: the pool fetches, verifies and inflates them into the cache in parallel.
            # Not remembered: should the cache refuse one, it would push the span being read out of memory.
            # Spans already on disk are skipped.
            self._request(ahead, deadline, remember=False, skip_cached=True, merge=1)

    def _request(self, ids: Iterable[int], deadline: float, *, remember: bool, skip_cached: bool = False,
                 merge: int | None = None, here: bool = False, to_memory: bool = False) -> dict[int, bytes | _Claim]:
        """Start loading `ids`: each maps to its bytes (kept in memory) or the claim to wait on, whose
        result is the span's bytes when kept in memory and None when it is in the on-disk cache.

        remember: keep spans the cache refused in memory for the reads that follow.
        skip_cached: spans present on disk are left out entirely (read-ahead, prefetch, background).
        here: load them in this thread instead of the pool (returns when they are settled).
        to_memory: inflate into memory, not the cache (a span that vanished from the cache while read).
        """
        out: dict[int, bytes | _Claim] = {}
        mine: list[int] = []
        if skip_cached:
            ids = [s for s in ids if not self._on_disk(s)]
        now = time.monotonic()
        with self._mu:
            for sid in ids:
                data = self._mem.get(sid)
                if data is not None:
                    self._mem.move_to_end(sid)
                    out[sid] = data
                    continue
                claim = self._claims.get(sid)
                # A claim past its deadline may sit in a fetch that hangs: start a fresh one.
                if claim is None or (claim.deadline < now and not claim.future.done()) or to_memory:
                    claim = self._claims[sid] = _Claim(deadline)
                    mine.append(sid)
                out[sid] = claim
        for run in _runs(mine, merge or self.MAX_MERGE_SPANS):
            claims = [out[sid] for sid in run]
            if here:
                self._load_run(run, claims, deadline, remember, to_memory)  # type: ignore[arg-type]
                continue
            try:
                self._pool.submit(self._load_run, run, claims, deadline, remember, to_memory)
            except RuntimeError:  # the pool is shut down: the manager was closed
                for sid, claim in zip(run, claims, strict=True):
                    self._fail(sid, claim, SpanFetchError(f"{self.layer}: the mount is closed"))  # type: ignore[arg-type]
        return out

    def _wait(self, sid: int, item: bytes | _Claim, deadline: float) -> bytes | None:
        if isinstance(item, bytes):
            return item
        try:
            return item.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("%s: span %d not available within %.0fs", self.layer, sid, self.timeout)
            raise SpanFetchError(f"{self.layer}: span {sid} not fetched within {self.timeout:.0f}s") from None
        except SpanFetchError:
            raise
        except Exception as exc:
            raise SpanFetchError(f"{self.layer}: span {sid}: {exc}") from exc

    def _settle(self, sid: int, claim: _Claim, data: bytes | None, remember: bool) -> None:
        with self._mu:
            if self._claims.get(sid) is claim:
                del self._claims[sid]
            if remember and data is not None:
                self._mem[sid] = data
                self._mem.move_to_end(sid)
                while len(self._mem) > self.MEMORY_SPANS:
                    self._mem.popitem(last=False)
        with contextlib.suppress(InvalidStateError):
            claim.future.set_result(data)

    def _fail(self, sid: int, claim: _Claim, exc: BaseException) -> None:
        with self._mu:
            if self._claims.get(sid) is claim:
                del self._claims[sid]
        with contextlib.suppress(InvalidStateError):
            claim.future.set_exception(exc)

    # -- loading (pool threads) -------------------------------------------------

    def _load_run(self, run: list[int], claims: list[_Claim], deadline: float, remember: bool,
                  to_memory: bool) -> None:
        pending = dict(zip(run, claims, strict=True))
        try:
            if not to_memory:
                self._take_cached(pending)
            if not pending:
                return
            with contextlib.ExitStack() as locks:
                # Ascending order everywhere, so two processes locking overlapping runs cannot deadlock.
                for sid in sorted(pending):
                    us, ue = self._u_start[sid], self._u_end[sid]
                    locks.enter_context(self.cache.span_lock(self.layer, us, ue - us,
                                                             max(0.0, deadline - time.monotonic())))
                # Another process (or manager) may have fetched these while we waited for the locks.
                if not to_memory:
                    self._take_cached(pending)
                for sub in _runs(sorted(pending), self.MAX_MERGE_SPANS):
                    self._fetch_run(sub, pending, deadline, remember, to_memory)
        except BaseException as exc:
            err = exc if isinstance(exc, SpanFetchError) else SpanFetchError(f"{self.layer}: {exc}")
            for sid, claim in pending.items():
                self._fail(sid, claim, err)
            if not isinstance(exc, Exception):
                raise

    def _take_cached(self, pending: dict[int, _Claim]) -> None:
        for sid in sorted(pending):
            if self._on_disk(sid):
                self.stats.add(cache_hits=1)
                self._settle(sid, pending.pop(sid), None, False)

    def _fetch_run(self, run: list[int], pending: dict[int, _Claim], deadline: float, remember: bool,
                   to_memory: bool) -> None:
        self.stats.add(cache_misses=len(run))
        datas = self._fetch_ranges([(self._c_start[s], self._c_end[s] - self._c_start[s]) for s in run], deadline)
        for sid, data in zip(run, datas, strict=True):
            claim = pending.pop(sid)
            try:
                kept = self._store(sid, self._verified(sid, data, deadline), to_memory)
            except SpanFetchError as exc:
                self._fail(sid, claim, exc)
                continue
            except Exception as exc:
                self._fail(sid, claim, SpanFetchError(f"{self.layer}: span {sid}: {exc}"))
                continue
            self._settle(sid, claim, kept, remember)

    def _verified(self, sid: int, data: bytes | memoryview, deadline: float) -> bytes | memoryview:
        """The compressed span, checked against its digest (refetching a bad one)."""
        want = self.ztoc.span_digests[sid]
        c_len = self._c_end[sid] - self._c_start[sid]
        failures = 0
        while len(data) != c_len or dg.of_bytes(data) != want:
            failures += 1
            self.stats.add(verify_failures=1)
            if failures > self.retries:
                log.error("%s: span %d failed verification %d times (expected %s); not serving it",
                          self.layer, sid, failures, want)
                raise SpanFetchError(f"{self.layer}: span {sid} does not match its digest {want}")
            data = self._fetch_ranges([(self._c_start[sid], c_len)], deadline)[0]
        self.stats.add(spans_fetched=1)
        return data

    def _store(self, sid: int, compressed: bytes | memoryview, to_memory: bool) -> bytes | None:
        """Inflate a verified span into the on-disk cache (None), or into memory (its bytes) when the cache
        refuses it or `to_memory`."""
        us = self._u_start[sid]
        size = self._u_end[sid] - us
        if not to_memory and (w := self.cache.writer(self.layer, us, size)) is not None:
            try:
                got = inflate_span_into(self.zinfo, sid, compressed, w.write, self._inflate_buffer())
            except BaseException:
                w.abort()
                raise
            if got != size:
                w.abort()
                raise SpanFetchError(f"{self.layer}: span {sid} inflated to {got} bytes, expected {size}")
            if w.commit():
                return None
        u = extract_span(self.zinfo, sid, compressed)
        if len(u) != size:
            raise SpanFetchError(f"{self.layer}: span {sid} inflated to {len(u)} bytes, expected {size}")
        return u

    def _inflate_buffer(self) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self.INFLATE_CHUNK)
        return buf

    def _fetch_ranges(self, ranges: list[tuple[int, int]], deadline: float) -> list[bytes]:
        """One request for adjacent ranges; transport failures are retried with back-off until `deadline`."""
        wait = _RETRY_FIRST_WAIT
        while True:
            if self._closed:
                raise SpanFetchError(f"{self.layer}: the mount is closed")
            try:
                datas = self._fetch_once(ranges)
            except SpanFetchError:
                raise
            except Exception as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("%s: fetching %d bytes at %d failed: %s", self.layer,
                                sum(n for _, n in ranges), ranges[0][0], exc)
                    raise SpanFetchError(f"{self.layer}: fetch failed: {exc}") from exc
                time.sleep(min(wait, left))
                wait = min(wait * 2, _RETRY_MAX_WAIT)
                continue
            self.stats.add(bytes_fetched=sum(len(d) for d in datas))
            return datas

    def _fetch_once(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        if len(ranges) == 1:
            return [self.fetch(*ranges[0])]
        if self.fetch_many is not None:
            datas = self.fetch_many(ranges)
            if len(datas) != len(ranges):
                raise SpanFetchError(f"{self.layer}: fetch_many returned {len(datas)} parts for {len(ranges)}")
            return datas
        # Spans are contiguous in the blob: one Range request, cut into spans here (views, not copies).
        first = ranges[0][0]
        blob = self.fetch(first, ranges[-1][0] + ranges[-1][1] - first)
        mv = memoryview(blob)
        return [mv[o - first:o - first + n] for o, n in ranges]  # type: ignore[misc]

    # -- prefetch, background ----------------------------------------------------

    def fetch_span(self, span_id: int, timeout: float | None = None) -> bool:
        """Make sure one span is in the on-disk cache (background fetch). False if it already was."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = self._request([span_id], deadline, remember=False, skip_cached=True)
        item = got.get(span_id)
        if item is None:
            return False
        self._wait(span_id, item, deadline)
        return True

    def head_spans(self, files: Iterable[tuple[int, int]] | None = None) -> list[int]:
        """Spans that hold little more than the head of a file of at least a span, in layer order.

        `files`: (data offset, size) of the layer's regular files, if the caller has them (the zTOC a layer
        server keeps has no file list); else the zTOC's. Only a zTOC built with head spans (`soci create
        --head-span`) has such spans: in upstream's layout every span but the last is at least span_size."""
        big = self.zinfo.span_size
        if files is None:
            files = ((f.uncompressed_offset, f.uncompressed_size) for f in self.ztoc.files if f.type == REG)
        heads: set[int] = set()
        for offset, size in files:
            if size >= big:
                sid = self.spans_of(offset, 1)[0]
                if self._u_end[sid] - self._u_start[sid] < big // 2:
                    heads.add(sid)
        return sorted(heads)

    def _fetch_heads(self, files: Callable[[], Iterable[tuple[int, int]]] | None) -> None:
        heads = self.head_spans(files() if files is not None else None)
        if not heads:
            return
        log.info("%s: fetching the heads of %d big files ahead", self.layer, len(heads))
        others = [threading.Thread(target=self._fetch_spans_here, args=(heads[k::self.HEAD_THREADS],),
                                   name="soci-heads", daemon=True) for k in range(1, self.HEAD_THREADS)]
        for t in others:
            t.start()
        self._fetch_spans_here(heads[0::self.HEAD_THREADS])

    def _fetch_spans_here(self, ids: list[int]) -> None:
        for sid in ids:
            if self._closed:
                return
            with contextlib.suppress(Exception):  # a failed head is fetched again by the read that needs it
                self._request([sid], time.monotonic() + self.timeout, remember=False, skip_cached=True,
                              here=True)

    def start_prefetch(self, order: list[int]) -> threading.Thread | None:
        """Fetch these spans now, in this order (a prefetch artifact's), on threads of their own.

        Consecutive ids share one request; PREFETCH_THREADS requests run at once, so the link stays busy
        while a demand read on the pool can still overtake them. A span a read already claimed is waited
        for, not fetched twice. Best effort: failures are logged and left to the reads that need them."""
        ids = [s for s in dict.fromkeys(order) if 0 <= s < self.num_spans]
        if not ids or self._closed:
            return None
        self._prefetching = True
        runs: list[list[int]] = []
        for sid in ids:
            if runs and runs[-1][-1] == sid - 1 and len(runs[-1]) < self.PREFETCH_MERGE:
                runs[-1].append(sid)
            else:
                runs.append([sid])
        queue = iter(runs)
        lock = threading.Lock()
        failed: list[int] = []
        t0 = time.monotonic()
        fetched_before = self.stats.bytes_fetched

        def work() -> None:
            while not self._closed:
                with lock:
                    run = next(queue, None)
                if run is None:
                    return
                try:
                    got = self._request(run, time.monotonic() + self.timeout, remember=False, skip_cached=True,
                                        here=True)
                    for sid, item in got.items():
                        self._wait(sid, item, time.monotonic() + self.timeout)
                except Exception:  # noqa: BLE001 - best effort: the read that needs the span fetches it again
                    with lock:
                        failed.extend(run)

        def lead() -> None:
            others = [threading.Thread(target=work, name="soci-prefetch", daemon=True)
                      for _ in range(self.PREFETCH_THREADS - 1)]
            for t in others:
                t.start()
            work()
            for t in others:
                t.join()
            log.info("%s: prefetched %d spans (%.1f MB fetched) in %.2f s%s", self.layer, len(ids),
                     (self.stats.bytes_fetched - fetched_before) / 1e6, time.monotonic() - t0,
                     f"; {len(failed)} failed" if failed else "")

        lead_thread = threading.Thread(target=lead, name="soci-prefetch", daemon=True)
        lead_thread.start()
        return lead_thread

    def start_background_fetch(self, files: Callable[[], Iterable[tuple[int, int]]] | None = None) -> None:
        """Start fetching the heads of big files at once and the remaining spans after a quiet period
        (neither with background_fetch.disable); `files` lists the layer's regular files for head_spans.

        A big file's head (a model's header, an ELF header, an archive's first entry) is what a program
        opening it reads first; with head spans in the zTOC they are short, so fetching them all ahead
        costs little and spares a start that opens many big files one round trip per file."""
        from .background import BackgroundFetcher

        if self._closed or self.config.background_fetch.disable or self._background is not None:
            return
        if not self._prefetching:
            # A prefetch artifact already lists the heads its workload reads; the others would only
            # compete with it for the link (python-scipy on 200 Mbit/s: 5.44 -> 5.28 s, 93.1 -> 90.3 MB).
            threading.Thread(target=self._fetch_heads, args=(files,), name="soci-heads", daemon=True).start()
        bg = BackgroundFetcher(self.config.background_fetch)
        bg.add(self)
        bg.start()
        self._background = bg

    @property
    def background(self) -> object | None:
        """The BackgroundFetcher started by start_background_fetch, if any."""
        return self._background

    @property
    def closed(self) -> bool:
        return self._closed

    def release_memory(self) -> None:
        """Forget the inflated spans kept in memory (those the cache refused): for a mount gone quiet,
        whose next read, if any, can afford to fetch them again."""
        with self._mu:
            self._mem.clear()

    def note_activity(self) -> None:
        """A foreground read happened: background fetch pauses for the silence period."""
        self.last_activity = time.monotonic()

    def close(self) -> None:
        """Stop background work and release threads; later reads raise SpanFetchError."""
        if self._closed:
            return
        self._closed = True
        bg = self._background
        if bg is not None:
            bg.stop()  # type: ignore[attr-defined]
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._mu:
            claims = list(self._claims.items())
            self._claims.clear()
            self._mem.clear()
        for sid, claim in claims:
            self._fail(sid, claim, SpanFetchError(f"{self.layer}: the mount is closed"))
        # Its open entries: another manager on this cache opens again what it reads next.
        self.cache.close()

    def __enter__(self) -> SpanManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(ids: Iterable[int], limit: int) -> list[list[int]]:
    """Sorted ids split into runs of consecutive ids, each at most `limit` long."""
    runs: list[list[int]] = []
    for sid in sorted(ids):
        if runs and runs[-1][-1] == sid - 1 and len(runs[-1]) < limit:
            runs[-1].append(sid)
        else:
            runs.append([sid])
    return runs
