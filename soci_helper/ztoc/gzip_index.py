"""One streaming pass over a layer: its span checkpoints, span digests and uncompressed bytes."""

from __future__ import annotations

import ctypes
import hashlib
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


class GzipIndexer:
    """Feed the compressed layer in order; get back its uncompressed bytes; `finish` for the index.

    Checkpoints follow upstream's rule: inflate with Z_BLOCK and, at the end of the gzip header or
    of any deflate block that is not a member's last, add one when nothing was output yet or more
    than span_size bytes were output since the previous one. Concatenated members are inflated in
    turn with the counters and the window running on, so a point may also fall right after a later
    member's header.
    """

    def __init__(self, span_size: int = DEFAULT_SPAN_SIZE, backend: str | None = None) -> None:
        if span_size <= 0:
            raise ValueError("span size must be positive")
        self.span_size = span_size
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
        self._prev_byte = b""
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
        ctypes.memmove(self._base, self._base + self._pos - WINDOW_SIZE, WINDOW_SIZE)
        self._pos = self._emit = WINDOW_SIZE

    def _checkpoint(self, bits: int, data: bytes, base: int) -> None:
        at = self._totin
        window = ctypes.string_at(self._base + self._pos - WINDOW_SIZE, WINDOW_SIZE)
        self._points.append(pack_checkpoint(at, self._totout, bits, window))
        self._last = self._totout
        if self._hasher is not None:
            self._hasher.update(memoryview(data)[self._hashed_to - base:at - base])
            self._digests.append(_digest(self._hasher))
        h = hashlib.sha256()
        if bits:
            # The byte holding the leftover bits belongs to both neighbouring spans.
            h.update(data[at - 1 - base:at - base] if at - 1 >= base else self._prev_byte)
        self._hasher = h
        self._hashed_to = at

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
            if dt & zi.DT_BLOCK_END:
                self._in_header = False
            if dt & zi.DT_BLOCK_END and not dt & zi.DT_LAST_BLOCK and (
                    self._totout == 0 or self._totout - self._last > span):
                self._checkpoint(dt & zi.DT_BITS_MASK, data, base)
        if self._hasher is not None:
            self._hasher.update(memoryview(data)[self._hashed_to - base:])
            self._hashed_to = base + n
        self._prev_byte = data[-1:]
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
