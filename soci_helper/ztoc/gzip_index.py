"""One streaming pass over a layer: its span checkpoints, span digests and uncompressed bytes."""

from __future__ import annotations

import ctypes
import hashlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from soci_helper.errors import LayerError
from soci_helper.ztoc import inflate as zi
from soci_helper.ztoc.model import DEFAULT_SPAN_SIZE, WINDOW_SIZE
from soci_helper.ztoc.zinfo import TarZinfo, pack_checkpoint, pack_header

# Output is inflated into one buffer whose first WINDOW_SIZE bytes always hold the preceding
# history, so a checkpoint's window is a single slice (zero-filled before 32 KiB of output).
_OUT_SIZE = 1 << 20


@dataclass(slots=True)
class IndexResult:
    checkpoints: bytes
    span_digests: list[str]
    compressed_size: int
    uncompressed_size: int
    num_spans: int


def _digest(h: hashlib._Hash) -> str:
    return "sha256:" + h.hexdigest()


def _address(data: bytes) -> int:
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


# A checkpoint costs a 32 KiB window in the zTOC; a head-span point closer than this to the previous
# checkpoint would cost more zTOC bytes than it can save in span bytes.
_MIN_HEAD_GAP = 2 * WINDOW_SIZE


@dataclass(slots=True)
class _Boundary:
    """A deflate block boundary that may still become a checkpoint once the tar stream is parsed past it."""

    comp_in: int
    out: int
    bits: int
    pos: int  # where its output ends in the buffer, while its window is still there
    window: bytes | None = None


class GzipIndexer:
    """Feed the compressed layer in order; get back its uncompressed bytes; `finish` for the index.

    Checkpoints follow upstream's rule: inflate with Z_BLOCK and, at the end of the gzip header or
    of any deflate block that is not a member's last, add one when nothing was output yet or more
    than span_size bytes were output since the previous one. Concatenated members are inflated in
    turn with the counters and the window running on, so a point may also fall right after a later
    member's header.
    """

    def __init__(self, span_size: int = DEFAULT_SPAN_SIZE, backend: str | None = None,
                 head_span: int = 0) -> None:
        if span_size <= 0:
            raise ValueError("span size must be positive")
        if head_span < 0:
            raise ValueError("head span must not be negative")
        self.span_size = span_size
        # With head_span, mark_file() adds two checkpoints per marked file: at the last block boundary
        # before its data, and at the first one head_span bytes into it (see mark_file).
        self.head_span = head_span
        self._starts: deque[int] = deque()
        self._head_ends: deque[int] = deque()
        self._prev: _Boundary | None = None
        self._be = zi.load(backend)
        self._inf = zi.Inflater(self._be, zi.WBITS_GZIP)
        self._cap = WINDOW_SIZE + _OUT_SIZE
        self._buf = ctypes.create_string_buffer(self._cap)
        self._base = ctypes.addressof(self._buf)
        self._pos = WINDOW_SIZE
        self._emit = WINDOW_SIZE
        self._fed = 0
        self._totin = 0
        self._totout = 0
        self._last = 0
        self._points: list[bytes] = []
        self._digests: list[str] = []
        self._hasher: hashlib._Hash | None = None
        self._hashed_to = 0
        # Compressed bytes not hashed yet, from the byte before _hashed_to (which a checkpoint with
        # leftover bits shares with the next span) on: a head-span point may land one block back.
        self._carry = b""
        self._carry_base = 0
        self._member_ended = False
        self._in_header = True
        self._members = 0
        self._finished = False
        self._busy = False

    @property
    def backend(self) -> str:
        return self._be.name

    def _take(self) -> bytes:
        chunk = ctypes.string_at(self._base + self._emit, self._pos - self._emit)
        self._emit = self._pos
        return chunk

    def _slide(self) -> None:
        prev = self._prev
        if prev is not None and prev.window is None:
            # Its window is about to be overwritten: keep a copy while it may still become a checkpoint.
            prev.window = ctypes.string_at(self._base + prev.pos - WINDOW_SIZE, WINDOW_SIZE)
        ctypes.memmove(self._base, self._base + self._pos - WINDOW_SIZE, WINDOW_SIZE)
        self._pos = self._emit = WINDOW_SIZE

    def _compressed(self, lo: int, hi: int, data: bytes, base: int) -> bytes | memoryview:
        """Compressed bytes [lo, hi) from the carried tail and the current input (which starts at base)."""
        if lo >= base:
            return memoryview(data)[lo - base:hi - base]
        head = self._carry[lo - self._carry_base:min(hi, base) - self._carry_base]
        return head + data[:hi - base] if hi > base else head

    def _checkpoint(self, at: int, out: int, bits: int, window: bytes, data: bytes, base: int) -> None:
        self._points.append(pack_checkpoint(at, out, bits, window))
        self._last = out
        if self._hasher is not None:
            self._hasher.update(self._compressed(self._hashed_to, at, data, base))
            self._digests.append(_digest(self._hasher))
        h = hashlib.sha256()
        if bits:
            # The byte holding the leftover bits belongs to both neighbouring spans.
            h.update(self._compressed(at - 1, at, data, base))
        self._hasher = h
        self._hashed_to = at

    def _here(self, bits: int, data: bytes, base: int) -> None:
        window = ctypes.string_at(self._base + self._pos - WINDOW_SIZE, WINDOW_SIZE)
        self._checkpoint(self._totin, self._totout, bits, window, data, base)

    def mark_file(self, data_offset: int) -> None:
        """A file whose head should get its own short span starts at this uncompressed offset.

        Offsets must come in increasing order, each before the output passes the next block boundary
        after it: feed_iter, with head_span set, yields at every block boundary so that a tar parser fed
        from it can call this in time. Without head_span it does nothing.
        """
        if self.head_span:
            self._starts.append(data_offset)
            self._head_ends.append(data_offset + self.head_span)

    def _head_points(self, bits: int, data: bytes, base: int) -> None:
        """At a block boundary, with the tar parsed up to it: add the head-span checkpoints now due."""
        out = self._totout
        prev = self._prev
        starts = self._starts
        if starts and starts[0] < out:
            # A marked file starts in the block that just ended: its span starts at that block's start.
            while starts and starts[0] < out:
                starts.popleft()
            if prev is not None and prev.out - self._last >= _MIN_HEAD_GAP:
                window = prev.window
                if window is None:
                    window = ctypes.string_at(self._base + prev.pos - WINDOW_SIZE, WINDOW_SIZE)
                self._checkpoint(prev.comp_in, prev.out, prev.bits, window, data, base)
        ends = self._head_ends
        if ends and ends[0] <= out:
            while ends and ends[0] <= out:
                ends.popleft()
            if out - self._last >= _MIN_HEAD_GAP:
                self._here(bits, data, base)

    def feed(self, compressed: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume the next compressed bytes; return the uncompressed bytes they produced.

        The list holds everything this input inflates to, which a highly compressed input can
        make large: feed_iter keeps memory bounded by the output buffer instead.
        """
        return list(self.feed_iter(compressed))

    def feed_iter(self, compressed: bytes | bytearray | memoryview) -> Iterator[bytes]:
        """As feed, yielding output chunks (at most 1 MiB each) as they are produced.

        The iterator must be exhausted before the next feed or finish.
        """
        if self._finished:
            raise ValueError("feed after finish")
        if self._busy:
            raise ValueError("the previous feed_iter was not consumed")
        data = compressed if isinstance(compressed, bytes) else bytes(compressed)
        n = len(data)
        if not n:
            return
        self._busy = True
        base = self._fed
        self._fed += n
        strm = self._inf.strm
        ref = self._inf.ref
        inflate_fn = self._be.inflate
        strm.next_in = _address(data)
        strm.avail_in = n
        span = self.span_size
        head = self.head_span > 0
        while strm.avail_in:
            if self._member_ended:
                self._inf.reset(zi.WBITS_GZIP)
                self._member_ended = False
                self._in_header = True
            if self._pos == self._cap:
                if self._pos > self._emit:
                    yield self._take()
                self._slide()
            room = self._cap - self._pos
            strm.next_out = self._base + self._pos
            strm.avail_out = room
            avail_in = strm.avail_in
            ret = inflate_fn(ref, zi.Z_BLOCK)
            self._totin += avail_in - strm.avail_in
            produced = room - strm.avail_out
            self._totout += produced
            self._pos += produced
            if ret == zi.Z_STREAM_END:
                self._member_ended = True
                self._members += 1
                continue
            if ret != zi.Z_OK:
                if ret == zi.Z_BUF_ERROR and (strm.avail_in == 0 or strm.avail_out == 0):
                    continue
                self._fail(ret)
            dt = strm.data_type
            if not dt & zi.DT_BLOCK_END:
                continue
            self._in_header = False
            if dt & zi.DT_LAST_BLOCK:
                continue
            bits = dt & zi.DT_BITS_MASK
            if head:
                # The consumer parses the tar up to this boundary (and marks files) before we go on.
                if self._pos > self._emit:
                    yield self._take()
                self._head_points(bits, data, base)
            if self._totout == 0 or self._totout - self._last > span:
                self._here(bits, data, base)
            if head:
                self._prev = _Boundary(self._totin, self._totout, bits, self._pos)
        end = base + n
        keep = end
        if self._hasher is not None and head and self._prev is not None:
            keep = max(self._hashed_to, self._prev.comp_in)
        if self._hasher is not None:
            self._hasher.update(self._compressed(self._hashed_to, keep, data, base))
        self._hashed_to = keep
        lo = max(0, min(keep, end) - 1)
        self._carry = bytes(self._compressed(lo, end, data, base))
        self._carry_base = lo
        self._busy = False
        if self._pos > self._emit:
            yield self._take()

    def _fail(self, ret: int) -> None:
        msg = self._inf.strm.msg
        why = msg.decode("ascii", "replace") if msg else f"inflate error {ret}"
        self._inf.close()
        self._finished = True
        if self._in_header and not self._members:
            raise LayerError(f"layer is not gzip data ({why})")
        if self._in_header:
            raise LayerError(f"bytes after gzip member {self._members} are not another gzip member ({why})")
        raise LayerError(f"corrupt gzip data near compressed offset {self._totin} ({why})")

    def finish(self) -> IndexResult:
        """Check the stream ended cleanly and return the checkpoint blob and span digests."""
        if self._finished:
            raise ValueError("finish called twice")
        if self._busy:
            raise ValueError("the last feed_iter was not consumed")
        self._finished = True
        self._inf.close()
        if self._fed == 0:
            raise LayerError("layer is empty: no gzip data")
        if not self._member_ended:
            raise LayerError(f"gzip data is truncated after {self._fed} compressed bytes")
        if not self._points:
            raise LayerError("gzip data has no deflate stream to index")
        assert self._hasher is not None
        self._hasher.update(self._compressed(self._hashed_to, self._fed, b"", self._fed))
        self._digests.append(_digest(self._hasher))
        blob = b"".join([pack_header(len(self._points), self.span_size), *self._points])
        self._points.clear()
        return IndexResult(checkpoints=blob, span_digests=self._digests, compressed_size=self._fed,
                           uncompressed_size=self._totout, num_spans=len(self._digests))


class TarIndexer:
    """The same interface for an uncompressed tar layer: fixed spans, a TarZinfo blob."""

    def __init__(self, span_size: int = DEFAULT_SPAN_SIZE) -> None:
        if span_size <= 0:
            raise ValueError("span size must be positive")
        self.span_size = span_size
        self._size = 0
        self._hasher = hashlib.sha256()
        self._in_span = 0
        self._digests: list[str] = []
        self._finished = False

    def feed_iter(self, data: bytes | bytearray | memoryview) -> Iterator[bytes | memoryview]:
        """Same as feed(): an uncompressed layer yields its input unchanged."""
        return iter(self.feed(data))

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        if self._finished:
            raise ValueError("feed after finish")
        mv = memoryview(data).cast("B")
        pos = 0
        n = len(mv)
        while pos < n:
            take = min(n - pos, self.span_size - self._in_span)
            self._hasher.update(mv[pos:pos + take])
            pos += take
            self._in_span += take
            if self._in_span == self.span_size:
                self._digests.append(_digest(self._hasher))
                self._hasher = hashlib.sha256()
                self._in_span = 0
        self._size += n
        return [data] if n else []

    def finish(self) -> IndexResult:
        if self._finished:
            raise ValueError("finish called twice")
        self._finished = True
        if self._in_span:
            self._digests.append(_digest(self._hasher))
        blob = TarZinfo(span_size=self.span_size, size=self._size).to_bytes()
        return IndexResult(checkpoints=blob, span_digests=self._digests, compressed_size=self._size,
                           uncompressed_size=self._size, num_spans=len(self._digests))
