"""Random access into a layer: inflating one span from its checkpoint, and byte ranges across spans."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator

from soci_helper.errors import LayerError, ZtocError
from soci_helper.ztoc import inflate as zi
from soci_helper.ztoc.model import WINDOW_SIZE
from soci_helper.ztoc.zinfo import GzipZinfo, TarZinfo

_TRAILER = 8  # CRC32 + ISIZE after each gzip member
_GROW = 4 << 20

Reader = Callable[[int, int], bytes]

# A fresh, not yet shared bytes object of a given size that inflate may fill in place.
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def _pin(data: bytes | bytearray | memoryview) -> tuple[int, object]:
    """Address of the bytes and the object that keeps them alive (copying only read-only views)."""
    if isinstance(data, bytes):
        return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0, data
    mv = memoryview(data).cast("B")
    if mv.readonly:
        b = bytes(mv)
        return ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value or 0, b
    arr = (ctypes.c_char * len(mv)).from_buffer(mv)
    return ctypes.addressof(arr), arr


def _inflate_chunks(zinfo: GzipZinfo, span_id: int, compressed: bytes | bytearray | memoryview,
                    want: int | None, backend: str | None, out_addr: int, cap: int) -> Iterator[int]:
    """Inflate the span from its start into the `cap` bytes at `out_addr`, yielding how many it holds each
    time they are full and at the end (the consumer takes them before resuming): `want` bytes in all, or
    all until the data ends if None."""
    n = len(compressed)
    if n == 0:
        raise LayerError(f"span {span_id}: no compressed bytes given")
    addr, keep = _pin(compressed)
    be = zi.load(backend)
    bits = zinfo.bits[span_id]
    total = fill = 0
    with zi.Inflater(be, zi.WBITS_RAW) as inf:
        strm, ref = inf.strm, inf.ref
        if bits:
            first = ctypes.string_at(addr, 1)[0]
            be.prime(ref, bits, first >> (8 - bits))
            addr += 1
            n -= 1
        win = bytes(zinfo.window(span_id))
        be.set_dictionary(ref, ctypes.c_char_p(win), WINDOW_SIZE)
        strm.next_in = addr
        strm.avail_in = n
        raw = True
        while want is None or total < want:
            if fill == cap:
                yield fill
                fill = 0
            room = cap - fill if want is None else min(cap - fill, want - total)
            strm.next_out = out_addr + fill
            strm.avail_out = room
            ret = be.inflate(ref, zi.Z_NO_FLUSH)
            made = room - strm.avail_out
            fill += made
            total += made
            if ret == zi.Z_STREAM_END:
                # A member ended inside the span: the next member (if any) is a fresh gzip stream.
                left = strm.avail_in
                if raw:
                    if left < _TRAILER:
                        break
                    strm.next_in += _TRAILER
                    strm.avail_in = left = left - _TRAILER
                if not left:
                    break
                inf.reset(zi.WBITS_GZIP)
                raw = False
                continue
            if ret == zi.Z_BUF_ERROR or (ret == zi.Z_OK and strm.avail_in == 0 and strm.avail_out):
                break
            if ret != zi.Z_OK:
                why = strm.msg.decode("ascii", "replace") if strm.msg else f"inflate error {ret}"
                raise LayerError(f"span {span_id}: corrupt compressed data ({why})")
    del keep
    if want is not None and total < want:
        raise LayerError(f"span {span_id}: compressed data ends after {total} of {want} bytes")
    if fill:
        yield fill


def _inflate_span(zinfo: GzipZinfo, span_id: int, compressed: bytes | bytearray | memoryview,
                  want: int | None, backend: str | None) -> bytes:
    """Uncompressed bytes from the span's start; `want` of them, or all until the data ends if None."""
    if want == 0:
        return b""
    if want is not None and want > 1:
        # Inflate straight into the bytes object we return: no zero-fill, no final copy.
        # (Sizes 0 and 1 could be interpreter-shared singletons, hence the bytearray below.)
        result: bytes = _new_bytes(None, want)
        out_addr = ctypes.cast(ctypes.c_char_p(result), ctypes.c_void_p).value or 0
        for _ in _inflate_chunks(zinfo, span_id, compressed, want, backend, out_addr, want):
            pass
        return result
    size = _GROW if want is None else want
    buf = bytearray(size)
    parts: list[bytes] = []
    addr = ctypes.addressof((ctypes.c_char * size).from_buffer(buf)) if size else 0
    for got in _inflate_chunks(zinfo, span_id, compressed, want, backend, addr, size):
        parts.append(bytes(memoryview(buf)[:got]))
    return b"".join(parts)


def inflate_span_into(zinfo: GzipZinfo | TarZinfo, span_id: int, compressed: bytes | bytearray | memoryview,
                      sink: Callable[[memoryview], object], buffer: bytearray,
                      backend: str | None = None) -> int:
    """Stream the whole uncompressed span `span_id` to `sink` through `buffer`, never holding it whole.

    `compressed` is exactly the span's compressed range. Returns the bytes produced, which the
    caller checks against the span's size. Each view passed to `sink` is valid only during the call."""
    start, end = zinfo.uncompressed_range(span_id)
    if isinstance(zinfo, TarZinfo):
        sink(memoryview(compressed).cast("B"))
        return len(compressed)
    want = None if end is None else end - start
    if want == 0:
        return 0
    if not buffer:
        raise ValueError("inflate_span_into needs a non-empty buffer")
    addr = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))
    out = memoryview(buffer)
    total = 0
    for got in _inflate_chunks(zinfo, span_id, compressed, want, backend, addr, len(buffer)):
        sink(out[:got])
        total += got
    return total


def extract_span(zinfo: GzipZinfo | TarZinfo, span_id: int, compressed: bytes | bytearray | memoryview,
                 backend: str | None = None) -> bytes:
    """The whole uncompressed span `span_id`, given exactly its compressed range (zinfo.compressed_range)."""
    start, end = zinfo.uncompressed_range(span_id)
    if isinstance(zinfo, TarZinfo):
        if len(compressed) != end - start:
            raise LayerError(f"span {span_id}: got {len(compressed)} bytes, expected {end - start}")
        return bytes(compressed)
    want = None if end is None else end - start
    if want == 0:
        return b""
    return _inflate_span(zinfo, span_id, compressed, want, backend)


def extract_range(zinfo: GzipZinfo | TarZinfo, compressed_reader: Reader, start: int, length: int,
                  backend: str | None = None) -> bytes:
    """Uncompressed bytes [start, start+length), reading only the compressed spans that hold them.

    `compressed_reader(offset, length)` returns that many compressed bytes of the layer. The
    zinfo must know the compressed size when the range reaches into the last span.
    """
    if length < 0 or start < 0:
        raise ZtocError(f"invalid range start={start} length={length}")
    if length == 0:
        return b""
    stop = start + length
    first = zinfo.span_of(start)
    last = zinfo.span_of(stop - 1)
    c_start = zinfo.compressed_range(first)[0]
    c_end = zinfo.compressed_range(last)[1]
    if c_end is None:
        raise ZtocError("the layer's compressed size is needed to read its last span")
    data = compressed_reader(c_start, c_end - c_start)
    if len(data) != c_end - c_start:
        raise LayerError(f"short read: wanted {c_end - c_start} compressed bytes at {c_start}, got {len(data)}")
    mv = memoryview(data)
    if isinstance(zinfo, TarZinfo):
        return bytes(mv[start - c_start:stop - c_start])
    parts: list[bytes] = []
    for sid in range(first, last + 1):
        s_start, s_end = zinfo.compressed_range(sid)
        u_start, u_end = zinfo.uncompressed_range(sid)
        hi = stop if u_end is None else min(stop, u_end)
        chunk = _inflate_span(zinfo, sid, mv[s_start - c_start:(s_end or c_end) - c_start],
                              hi - u_start, backend)
        lo = max(start, u_start) - u_start
        parts.append(chunk[lo:] if lo else chunk)
    out = b"".join(parts)
    if len(out) != length:
        raise LayerError(f"range {start}+{length} reaches past the end of the layer")
    return out
