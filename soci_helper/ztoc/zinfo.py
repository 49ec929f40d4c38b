"""Span maps of a layer: the gzip checkpoint blob (GzipZinfo) and the uncompressed-tar TarZinfo."""

from __future__ import annotations

import bisect
import os
import struct

try:
    # zlib's CRC-32, about 4x faster: a mount checksums all its windows (9.6 MB for a 1 GB layer) once.
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; stdlib zlib does the same, slower
    from zlib import crc32

from soci_helper.errors import ZtocError
from soci_helper.ztoc.model import WINDOW_SIZE

HEADER_SIZE = 12  # int32 checkpoint count + int64 span size
CHECKPOINT_SIZE = 8 + 8 + 1 + WINDOW_SIZE  # in, out, bits, window
TAR_ZINFO_VERSION = 2

_HEADER = struct.Struct("<iq")
_POINT = struct.Struct("<qqB")
_ZERO_WINDOW = memoryview(bytes(WINDOW_SIZE))
# The older layout omitted checkpoint 0 because it assumed a bare 10-byte gzip header.
_V1_FIRST_IN = 10


def pack_header(count: int, span_size: int) -> bytes:
    return _HEADER.pack(count, span_size)


def pack_checkpoint(comp_in: int, out: int, bits: int, window: bytes | memoryview) -> bytes:
    if len(window) != WINDOW_SIZE:
        raise ValueError("a checkpoint window is exactly 32768 bytes")
    return _POINT.pack(comp_in, out, bits) + bytes(window)


class GzipZinfo:
    """A parsed, validated gzip checkpoint blob.

    Offsets are kept as small lists; windows stay in the blob and are sliced on demand.
    `compressed_size` / `uncompressed_size` (the layer's sizes, when known) bound the last span.
    """

    __slots__ = ("span_size", "ins", "outs", "bits", "_windows", "_first_window_stored", "legacy",
                 "compressed_size", "uncompressed_size", "raw", "_file")

    def __init__(self, blob: bytes | bytearray | memoryview, compressed_size: int | None = None,
                 uncompressed_size: int | None = None) -> None:
        mv = memoryview(blob).cast("B") if not isinstance(blob, memoryview) else blob.cast("B")
        n_bytes = len(mv)
        if n_bytes < HEADER_SIZE:
            raise ZtocError(f"gzip checkpoint blob is {n_bytes} bytes, shorter than its 12-byte header")
        count, span_size = _HEADER.unpack_from(mv, 0)
        if count <= 0:
            raise ZtocError(f"gzip checkpoint blob declares {count} checkpoints; at least one is required")
        if span_size <= 0:
            raise ZtocError(f"gzip checkpoint blob has a non-positive span size {span_size}")
        body = n_bytes - HEADER_SIZE
        if body == CHECKPOINT_SIZE * count:
            legacy = False
        elif body == CHECKPOINT_SIZE * (count - 1):
            legacy = True
        else:
            raise ZtocError(
                f"gzip checkpoint blob is {n_bytes} bytes but declares {count} checkpoints "
                f"(expected {HEADER_SIZE + CHECKPOINT_SIZE * count} bytes)")
        stored = count - 1 if legacy else count
        ins: list[int] = [_V1_FIRST_IN] if legacy else []
        outs: list[int] = [0] if legacy else []
        bits: list[int] = [0] if legacy else []
        off = HEADER_SIZE
        for _ in range(stored):
            i, o, b = _POINT.unpack_from(mv, off)
            ins.append(i)
            outs.append(o)
            bits.append(b)
            off += CHECKPOINT_SIZE
        self.span_size = span_size
        self.ins = ins
        self.outs = outs
        self.bits = bits
        self.legacy = legacy
        self.raw = mv
        self._windows = mv[HEADER_SIZE:]
        self._first_window_stored = not legacy
        self.compressed_size = compressed_size
        self.uncompressed_size = uncompressed_size
        self._file: _WindowFile | None = None
        self._validate()

    def _validate(self) -> None:
        ins, outs, bits = self.ins, self.outs, self.bits
        if outs[0] != 0:
            raise ZtocError(f"gzip checkpoint 0 is at uncompressed offset {outs[0]}, not 0")
        for k in range(len(ins)):
            if bits[k] > 7:
                raise ZtocError(f"gzip checkpoint {k} has {bits[k]} leftover bits; at most 7 are possible")
            if ins[k] < 0 or outs[k] < 0:
                raise ZtocError(f"gzip checkpoint {k} has a negative offset")
            if bits[k] and ins[k] < 1:
                raise ZtocError(f"gzip checkpoint {k} has leftover bits but no preceding byte")
            if k:
                if ins[k] <= ins[k - 1]:
                    raise ZtocError(f"gzip checkpoint {k} compressed offset {ins[k]} does not follow "
                                    f"checkpoint {k - 1} at {ins[k - 1]}")
                # Equal uncompressed offsets only arise from empty deflate blocks before any output.
                if outs[k] < outs[k - 1] or (outs[k] == outs[k - 1] and outs[k] != 0):
                    raise ZtocError(f"gzip checkpoint {k} uncompressed offset {outs[k]} does not follow "
                                    f"checkpoint {k - 1} at {outs[k - 1]}")
        cs, us = self.compressed_size, self.uncompressed_size
        if cs is not None and ins[-1] > cs:
            raise ZtocError(f"gzip checkpoint at compressed offset {ins[-1]} lies beyond the layer's "
                            f"{cs} compressed bytes")
        if us is not None and outs[-1] > us:
            raise ZtocError(f"gzip checkpoint at uncompressed offset {outs[-1]} lies beyond the layer's "
                            f"{us} uncompressed bytes")

    @property
    def num_spans(self) -> int:
        return len(self.ins)

    @property
    def max_span_id(self) -> int:
        return len(self.ins) - 1

    def _check(self, span_id: int) -> None:
        if not 0 <= span_id < len(self.ins):
            raise ZtocError(f"span {span_id} does not exist (the layer has {len(self.ins)} spans)")

    def window(self, span_id: int) -> memoryview:
        """The 32 KiB dictionary that precedes span `span_id` (a view into the blob, or read from its file)."""
        self._check(span_id)
        k = span_id if self._first_window_stored else span_id - 1
        if k < 0:
            return _ZERO_WINDOW
        start = k * CHECKPOINT_SIZE + _POINT.size
        if self._file is not None:
            return self._file.window(k, start)
        return self._windows[start:start + WINDOW_SIZE]

    @property
    def windows_in_file(self) -> bool:
        return self._file is not None

    def windows_from_file(self, fd: int, offset: int) -> None:
        """Read the windows (32 KiB a span) from the open file `fd`, where this blob starts at `offset`,
        instead of keeping them in memory. The file must hold the same blob now (ZtocError otherwise); a
        crc32 per window, taken from the bytes in memory, catches a file changed later."""
        if self._file is not None:
            return
        stored = len(self._windows) // CHECKPOINT_SIZE
        # The header and the first and last checkpoints, not the whole blob (20 ms for 3.5 MB, on the mount's
        # path): a window that differs anyway fails its crc32 when used, never inflating into wrong bytes.
        probes = [(0, HEADER_SIZE + CHECKPOINT_SIZE)]
        if stored > 1:
            probes.append((len(self.raw) - CHECKPOINT_SIZE, CHECKPOINT_SIZE))
        for start, n in probes:
            if os.pread(fd, n, offset + start) != bytes(self.raw[start:start + n]):
                raise ZtocError("the zTOC file does not hold these checkpoints")
        crcs = [crc32(self._windows[k * CHECKPOINT_SIZE + _POINT.size:(k + 1) * CHECKPOINT_SIZE])
                for k in range(stored)]
        self._file = _WindowFile(fd, offset, len(self.raw), crcs)
        self.raw = self._windows = memoryview(b"")

    def uncompressed_range(self, span_id: int) -> tuple[int, int | None]:
        """[start, end) of the span in the uncompressed tar; end is None for the last span if size unknown."""
        self._check(span_id)
        end = self.outs[span_id + 1] if span_id + 1 < len(self.outs) else self.uncompressed_size
        return self.outs[span_id], end

    def compressed_range(self, span_id: int) -> tuple[int, int | None]:
        """[start, end) of the span's bytes in the blob: from the byte holding leftover bits if any,
        to the next checkpoint's whole byte (the last span runs to the blob end, trailer included)."""
        self._check(span_id)
        start = self.ins[span_id] - (1 if self.bits[span_id] else 0)
        end = self.ins[span_id + 1] if span_id + 1 < len(self.ins) else self.compressed_size
        return start, end

    def span_of(self, uncompressed_offset: int) -> int:
        """The span holding `uncompressed_offset` (the last checkpoint at or before it)."""
        if uncompressed_offset < 0 or (self.uncompressed_size is not None
                                       and uncompressed_offset >= self.uncompressed_size):
            raise ZtocError(f"uncompressed offset {uncompressed_offset} is outside the layer")
        return bisect.bisect_right(self.outs, uncompressed_offset) - 1

    def to_bytes(self) -> bytes:
        """The blob in the current layout (checkpoint 0 included), as upstream writes it."""
        raw = self.raw if self._file is None else memoryview(self._file.blob())
        if not self.legacy:
            return bytes(raw)
        parts = [pack_header(len(self.ins), self.span_size),
                 pack_checkpoint(self.ins[0], 0, 0, _ZERO_WINDOW), bytes(raw[HEADER_SIZE:])]
        return b"".join(parts)


class _WindowFile:
    """Checkpoint windows read from the file that holds the blob, each checked against a crc32."""

    __slots__ = ("fd", "offset", "size", "crcs")

    def __init__(self, fd: int, offset: int, size: int, crcs: list[int]) -> None:
        self.fd, self.offset, self.size, self.crcs = fd, offset, size, crcs

    def window(self, k: int, start: int) -> memoryview:
        try:
            w = os.pread(self.fd, WINDOW_SIZE, self.offset + HEADER_SIZE + start)
        except OSError as exc:
            raise ZtocError(f"cannot read checkpoint window {k} from the zTOC file: {exc.strerror or exc}") from None
        if len(w) != WINDOW_SIZE or crc32(w) != self.crcs[k]:
            raise ZtocError(f"checkpoint window {k} changed in the zTOC file since it was verified")
        return memoryview(w)

    def blob(self) -> bytes:
        """The whole blob, every window checked."""
        data = os.pread(self.fd, self.size, self.offset)
        if len(data) != self.size:
            raise ZtocError("the zTOC file is shorter than its checkpoints")
        mv = memoryview(data)
        for k, want in enumerate(self.crcs):
            start = HEADER_SIZE + k * CHECKPOINT_SIZE + _POINT.size
            if crc32(mv[start:start + WINDOW_SIZE]) != want:
                raise ZtocError(f"checkpoint window {k} changed in the zTOC file since it was verified")
        return data


class TarZinfo:
    """Fixed-size spans over an uncompressed tar; compressed and uncompressed offsets coincide."""

    __slots__ = ("version", "span_size", "size")

    def __init__(self, span_size: int, size: int, version: int = TAR_ZINFO_VERSION) -> None:
        if version != TAR_ZINFO_VERSION:
            raise ZtocError(f"tar zinfo version {version} is not supported (expected {TAR_ZINFO_VERSION})")
        if span_size <= 0:
            raise ZtocError(f"tar zinfo has a non-positive span size {span_size}")
        if size < 0:
            raise ZtocError(f"tar zinfo has a negative layer size {size}")
        self.version = version
        self.span_size = span_size
        self.size = size

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, size: int | None = None) -> TarZinfo:
        """Decode the TarZinfo flatbuffer; `size`, when given, must match the layer size it records."""
        buf = bytes(data)
        n = len(buf)

        def bad(why: str) -> ZtocError:
            return ZtocError(f"tar zinfo flatbuffer is malformed: {why}")

        if n < 8:
            raise bad(f"only {n} bytes")
        (root,) = struct.unpack_from("<I", buf, 0)
        if root + 4 > n or root % 4:
            raise bad("root table offset out of range")
        (soff,) = struct.unpack_from("<i", buf, root)
        vt = root - soff
        if vt < 0 or vt + 4 > n or vt % 2:
            raise bad("vtable offset out of range")
        vt_size, tbl_size = struct.unpack_from("<HH", buf, vt)
        if vt_size < 4 or vt_size % 2 or vt + vt_size > n or root + tbl_size > n or tbl_size < 4:
            raise bad("vtable size out of range")

        def field(slot: int, fmt: str) -> int:
            pos = 4 + 2 * slot
            if pos + 2 > vt_size:
                return 0
            (fo,) = struct.unpack_from("<H", buf, vt + pos)
            if fo == 0:
                return 0
            width = struct.calcsize(fmt)
            if fo < 4 or fo + width > tbl_size:
                raise bad(f"field {slot} lies outside its table")
            return struct.unpack_from(fmt, buf, root + fo)[0]

        z = cls(span_size=field(1, "<q"), size=field(2, "<q"), version=field(0, "<i"))
        if size is not None and size != z.size:
            raise ZtocError(f"tar zinfo records a {z.size}-byte layer but the layer is {size} bytes")
        return z

    def to_bytes(self) -> bytes:
        # Same builder calls, in the same order, as upstream's generated Go code: identical bytes.
        # Imported here: flatbuffers pulls in numpy when installed, which no reader of zTOCs needs.
        import flatbuffers

        b = flatbuffers.Builder(0)
        b.StartObject(3)
        b.PrependInt32Slot(0, self.version, 0)
        b.PrependInt64Slot(1, self.span_size, 0)
        b.PrependInt64Slot(2, self.size, 0)
        b.Finish(b.EndObject())
        return bytes(b.Output())

    @property
    def compressed_size(self) -> int:
        return self.size

    @property
    def uncompressed_size(self) -> int:
        return self.size

    @property
    def num_spans(self) -> int:
        return -(-self.size // self.span_size)

    @property
    def max_span_id(self) -> int:
        return self.num_spans - 1

    def _check(self, span_id: int) -> None:
        if not 0 <= span_id < self.num_spans:
            raise ZtocError(f"span {span_id} does not exist (the layer has {self.num_spans} spans)")

    def uncompressed_range(self, span_id: int) -> tuple[int, int]:
        self._check(span_id)
        start = span_id * self.span_size
        return start, min(start + self.span_size, self.size)

    def compressed_range(self, span_id: int) -> tuple[int, int]:
        return self.uncompressed_range(span_id)

    def span_of(self, uncompressed_offset: int) -> int:
        if not 0 <= uncompressed_offset < self.size:
            raise ZtocError(f"uncompressed offset {uncompressed_offset} is outside the layer")
        return uncompressed_offset // self.span_size


Zinfo = GzipZinfo | TarZinfo


def spans_of(zinfo: Zinfo, offset: int, length: int) -> range:
    """The span ids holding uncompressed bytes [offset, offset+length), clamped to the layer (empty if none)."""
    end = offset + length
    if zinfo.uncompressed_size is not None:
        end = min(end, zinfo.uncompressed_size)
    if length <= 0 or offset < 0 or offset >= end:
        return range(0)
    return range(zinfo.span_of(offset), zinfo.span_of(end - 1) + 1)
