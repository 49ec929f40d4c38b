"""Random access into a layer: inflating one span from its checkpoint, and byte ranges across spans."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

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


def _inflate_span(zinfo: GzipZinfo, span_id: int, compressed: bytes | bytearray | memoryview,
                  want: int | None, backend: str | None) -> bytes:
    """Uncompressed bytes from the span's start; `want` of them, or all until the data ends if None."""
    n = len(compressed)
    if n == 0:
        raise LayerError(f"span {span_id}: no compressed bytes given")
    addr, keep = _pin(compressed)
    be = zi.load(backend)
    bits = zinfo.bits[span_id]
    with zi.Inflater(be, zi.WBITS_RAW) as inf:
        strm, ref = inf.strm, inf.ref
        if bits:
            first = ctypes.string_at(addr, 1)[0]
            be.prime(ref, bits, first >> (8 - bits))
            addr += 1
            n -= 1
        win = bytes(zinfo.window(span_id))
        be.set_dictionary(ref, ctypes.c_char_p(win), WINDOW_SIZE)
        if want is not None and want > 1:
            # Inflate straight into the bytes object we return: no zero-fill, no final copy.
            # (Sizes 0 and 1 could be interpreter-shared singletons, hence the bytearray below.)
            result: bytes | bytearray = _new_bytes(None, want)
            out_addr = ctypes.cast(ctypes.c_char_p(result), ctypes.c_void_p).value or 0
            cap = want
        elif want is not None:
            result = bytearray(want)
            cap = want
            out_addr = ctypes.addressof((ctypes.c_char * cap).from_buffer(result))
        else:
            result = bytearray(_GROW)
            cap = _GROW
            out_addr = ctypes.addressof((ctypes.c_char * cap).from_buffer(result))
        got = 0
        strm.next_in = addr
        strm.avail_in = n
        raw = True
        while want is None or got < want:
            if got == cap:
                cap += _GROW
                result.extend(bytes(_GROW))  # type: ignore[union-attr]
                out_addr = ctypes.addressof((ctypes.c_char * cap).from_buffer(result))
            strm.next_out = out_addr + got
            strm.avail_out = cap - got
            before = strm.avail_out
            ret = be.inflate(ref, zi.Z_NO_FLUSH)
            got += before - strm.avail_out
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
    if want is not None:
        if got < want:
            raise LayerError(f"span {span_id}: compressed data ends after {got} of {want} bytes")
        return result if isinstance(result, bytes) else bytes(result)
    return bytes(memoryview(result)[:got])


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
