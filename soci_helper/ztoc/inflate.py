"""The raw inflate back end (zlib-ng native API or system zlib) reached through ctypes."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass

Z_NO_FLUSH = 0
Z_FINISH = 4
Z_BLOCK = 5

Z_OK = 0
Z_STREAM_END = 1
Z_NEED_DICT = 2
Z_STREAM_ERROR = -2
Z_DATA_ERROR = -3
Z_MEM_ERROR = -4
Z_BUF_ERROR = -5

# Bits of z_stream.data_type after inflate(Z_BLOCK): unused bit count, "in the last block",
# "stopped right after an end-of-block code or after the stream header".
DT_BITS_MASK = 7
DT_LAST_BLOCK = 64
DT_BLOCK_END = 128

WBITS_RAW = -15
WBITS_GZIP = 31

_alloc_func = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
_free_func = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)


class ZStream(ctypes.Structure):
    """zlib's `z_stream` (uInt is 32-bit, uLong is the platform's long)."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint),
        ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint),
        ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", _alloc_func),
        ("zfree", _free_func),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_ulong),
        ("reserved", ctypes.c_ulong),
    ]


class ZngStream(ctypes.Structure):
    """zlib-ng's native `zng_stream`: size_t totals and a 32-bit adler, unlike z_stream."""

    _fields_ = [
        ("next_in", ctypes.c_void_p),
        ("avail_in", ctypes.c_uint32),
        ("total_in", ctypes.c_size_t),
        ("next_out", ctypes.c_void_p),
        ("avail_out", ctypes.c_uint32),
        ("total_out", ctypes.c_size_t),
        ("msg", ctypes.c_char_p),
        ("state", ctypes.c_void_p),
        ("zalloc", _alloc_func),
        ("zfree", _free_func),
        ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int),
        ("adler", ctypes.c_uint32),
        ("reserved", ctypes.c_ulong),
    ]


@dataclass(frozen=True, slots=True)
class Backend:
    """One loaded inflate library with uniformly named entry points.

    Each function takes a pointer to `stream_type` first, as the C API does.
    """

    name: str
    stream_type: type[ctypes.Structure]
    init2: object
    inflate: object
    end: object
    reset2: object
    prime: object
    set_dictionary: object

    def new_stream(self, wbits: int) -> ctypes.Structure:
        """A fresh, initialized stream; the caller must `end` it (see Inflater)."""
        strm = self.stream_type()
        ret = self.init2(ctypes.byref(strm), wbits)
        if ret != Z_OK:
            raise MemoryError(f"{self.name}: inflateInit2 failed ({ret})")
        return strm


def _bind(lib: ctypes.CDLL, prefix: str, stream_type: type[ctypes.Structure]) -> dict[str, object]:
    p = ctypes.POINTER(stream_type)

    def fn(name: str, *args: object) -> object:
        f = getattr(lib, prefix + name)
        f.restype = ctypes.c_int
        f.argtypes = [p, *args]
        return f

    return {
        "inflate": fn("inflate", ctypes.c_int),
        "end": fn("inflateEnd"),
        "reset2": fn("inflateReset2", ctypes.c_int),
        "prime": fn("inflatePrime", ctypes.c_int, ctypes.c_int),
        "set_dictionary": fn("inflateSetDictionary", ctypes.c_void_p, ctypes.c_uint),
    }


def _load_zlib_ng() -> Backend | None:
    try:
        from zlib_ng import zlib_ng as ext
    except ImportError:
        return None
    path = getattr(ext, "__file__", None)
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
        init2 = lib.zng_inflateInit2
    except (OSError, AttributeError):
        return None
    init2.restype = ctypes.c_int
    init2.argtypes = [ctypes.POINTER(ZngStream), ctypes.c_int]
    try:
        fns = _bind(lib, "zng_", ZngStream)
    except AttributeError:
        return None
    return Backend(name="zlib-ng", stream_type=ZngStream, init2=init2, **fns)


def _load_zlib() -> Backend | None:
    path = ctypes.util.find_library("z")
    if not path:
        return None
    try:
        lib = ctypes.CDLL(path)
        fns = _bind(lib, "", ZStream)
        raw_init = lib.inflateInit2_
        version = lib.zlibVersion
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    raw_init.restype = ctypes.c_int
    raw_init.argtypes = [ctypes.POINTER(ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    ver = version()
    size = ctypes.sizeof(ZStream)

    # inflateInit2 is a macro in zlib.h; the exported symbol also checks version and struct size.
    def init2(strm: object, wbits: int) -> int:
        return raw_init(strm, wbits, ver, size)

    return Backend(name="zlib", stream_type=ZStream, init2=init2, **fns)


@functools.cache
def load(name: str | None = None) -> Backend:
    """The back end `name` ("zlib" or "zlib-ng"); by default SOCI_INFLATE, else zlib-ng, else zlib."""
    want = name if name is not None else os.environ.get("SOCI_INFLATE", "").strip().lower() or None
    if want not in (None, "zlib", "zlib-ng"):
        raise ValueError(f"unknown inflate back end {want!r}: use zlib or zlib-ng")
    if want in (None, "zlib-ng"):
        b = _load_zlib_ng()
        if b is not None:
            return b
        if want == "zlib-ng":
            raise RuntimeError("zlib-ng back end requested but the zlib_ng module is not usable")
    b = _load_zlib()
    if b is None:
        raise RuntimeError("no inflate back end: neither zlib-ng nor the system zlib can be loaded")
    return b


def available() -> list[str]:
    """Names of the back ends that load on this system."""
    out = []
    if _load_zlib_ng() is not None:
        out.append("zlib-ng")
    if _load_zlib() is not None:
        out.append("zlib")
    return out


class Inflater:
    """A stream that is always ended, even when the caller forgets: C memory must not leak."""

    __slots__ = ("backend", "strm", "ref", "_live")

    def __init__(self, backend: Backend, wbits: int) -> None:
        self.backend = backend
        self.strm = backend.new_stream(wbits)
        self.ref = ctypes.byref(self.strm)
        self._live = True

    def reset(self, wbits: int) -> None:
        ret = self.backend.reset2(self.ref, wbits)
        if ret != Z_OK:
            raise MemoryError(f"{self.backend.name}: inflateReset2 failed ({ret})")

    def close(self) -> None:
        if self._live:
            self._live = False
            self.backend.end(self.ref)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> Inflater:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
