"""zTOC flatbuffer codec: encode a Ztoc byte-for-byte as upstream SOCI does; decode untrusted bytes safely."""

# Schema (namespace `ztoc`, root `Ztoc`, no file identifier), slots in vtable order:
#
#   Xattr:           0 key:string, 1 value:string
#   FileMetadata:    0 name, 1 type, 2 uncompressed_offset:long, 3 uncompressed_size:long, 4 linkname,
#                    5 mode:long, 6 uid:uint, 7 gid:uint, 8 uname, 9 gname, 10 mod_time, 11 devmajor:long,
#                    12 devminor:long, 13 xattrs:[Xattr]
#   CompressionInfo: 0 compression_algorithm:byte = 1 (Gzip), 1 max_span_id:int, 2 span_digests:[string],
#                    3 checkpoints:[ubyte]
#   TOC:             0 metadata:[FileMetadata]
#   Ztoc:            0 version, 1 build_tool_identifier, 2 compressed_archive_size:long,
#                    3 uncompressed_archive_size:long, 4 toc:TOC, 5 compression_info:CompressionInfo
#
# Encoding replays the calls upstream's Go marshaller makes (same creation order, same omission of scalars
# equal to their default) through a small builder that follows the Go flatbuffers runtime's algorithm
# (alignment counted from the buffer end, trailing-zero vtable trimming, vtable sharing that compares field
# offsets only), so the bytes equal upstream's for the same zTOC.

from __future__ import annotations

import gc
import re
import struct
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any

from soci_helper import digest as _digest
from soci_helper.errors import DigestError, ZtocError
from soci_helper.ztoc.model import ENTRY_TYPES, CompressionAlgorithm, FileMetadata, Ztoc

__all__ = ["encode", "decode", "decode_raw", "RawEntry", "UnorderedEntries", "MAX_ZTOC_SIZE"]

# Flatbuffer offsets are 32-bit and signed offsets reach only 2 GiB.
MAX_ZTOC_SIZE = (1 << 31) - 1
# Distinct vtable contents accepted in one zTOC (upstream's writer makes at most a few hundred).
_MAX_LAYOUTS = 4096

_ENC = "utf-8"
_FREE = "surrogateescape"

_U16x2 = struct.Struct("<HH").unpack_from
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_pack_u32 = _U32.pack
_pack_i32 = _I32.pack
_u32 = _U32.unpack_from
_i32 = _I32.unpack_from

_ZEROS = tuple(bytes(k) for k in range(9))

# Field kinds: struct code and byte size. "U" is a uoffset to a string, vector or table.
_SIZE = {"U": 4, "q": 8, "i": 4, "I": 4, "b": 1}
_CODE = {"U": "I", "q": "q", "i": "i", "I": "I", "b": "b"}

_XATTR_KINDS = ("U", "U")
_FILE_KINDS = ("U", "U", "q", "q", "U", "q", "I", "I", "U", "U", "U", "q", "q", "U")
_CINFO_KINDS = ("b", "i", "U", "U")
_TOC_KINDS = ("U",)
_ZTOC_KINDS = ("U", "U", "q", "q", "U", "U")
# Schema defaults that are not zero: compression_algorithm = Gzip.
_DEFAULTS = {_CINFO_KINDS: (int(CompressionAlgorithm.GZIP), 0, 0, 0)}

_FILE_TEXT_SLOTS = (0, 1, 4, 8, 9, 10, 13)  # name, type, linkname, uname, gname, mod_time, xattrs
_TYPE_BY_RAW = {t.encode(): t for t in ENTRY_TYPES}
_ALGO_BY_VALUE = {a.value: a for a in CompressionAlgorithm}
# What Go's time.MarshalText can emit (RFC 3339, any zone); "" is what upstream stores when it fails.
_MOD_TIME_RE = re.compile(rb"(?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d))?")


# --------------------------------------------------------------------------------------------- encoding


class _Builder:
    """Back-to-front flatbuffer builder producing the same bytes as the Go runtime for the calls used here.

    Offsets are counted from the end of the buffer, as in every flatbuffers runtime, so alignment padding
    depends only on what was written before; chunks are collected in write order and reversed at the end.
    """

    __slots__ = ("_chunks", "_off", "_minalign", "_vtables", "_plans")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._off = 0
        # Go starts at 1, but every buffer here holds 4-byte data before Finish, so 4 is equivalent.
        self._minalign = 4
        # Go reuses a vtable when the field offsets match, ignoring the recorded object size; keying on
        # the field offsets alone reproduces that choice.
        self._vtables: dict[tuple[int, ...], int] = {}
        # Table layouts depend only on the field list and the start offset mod 8.
        self._plans: dict[tuple[int, tuple[tuple[int, str, int], ...]], _Plan] = {}

    def string(self, data: bytes) -> int:
        n = len(data)
        pad = -(self._off + n + 1) & 3
        self._chunks.append(_pack_u32(n) + data + _ZEROS[pad + 1])
        self._off += n + pad + 5
        return self._off

    def byte_vector(self, data: bytes) -> int:
        n = len(data)
        pad = -(self._off + n) & 3
        self._chunks.append(_pack_u32(n) + data + _ZEROS[pad])
        self._off += n + pad + 4
        return self._off

    def offset_vector(self, targets: list[int]) -> int:
        off = self._off
        pad = -off & 3
        n = len(targets)
        base = off + pad + 4 * n
        # Element i is written (n - i)-th, so its slot ends at base - 4*i; the value is relative to it.
        values = [base - 4 * i - t for i, t in enumerate(targets)]
        self._chunks.append(struct.pack(f"<{n + 1}I", n, *values) + _ZEROS[pad])
        self._off = base + 4
        return self._off

    def table(self, sig: tuple[tuple[int, str, int], ...], values: tuple[int, ...]) -> int:
        """Write a table whose fields are added in `sig` order as (slot, kind, index into values)."""
        off = self._off
        plan = self._plans.get((off & 7, sig))
        if plan is None:
            plan = self._plans[(off & 7, sig)] = _plan_table(off & 7, sig)
        pack, spec, entries, vtable, size, wide = plan
        # A uoffset is stored relative to where it ends: table start + its end position - target.
        vals = [off + rel - values[i] if rel else values[i] for rel, i in spec]
        obj = off + size
        existing = self._vtables.get(entries)
        if existing is None:
            # The new vtable goes right before the table; the table's soffset is its size.
            self._chunks.append(pack(len(vtable), *vals))
            self._chunks.append(vtable)
            self._off = obj + len(vtable)
            self._vtables[entries] = self._off
        else:
            self._chunks.append(pack(existing - obj, *vals))
            self._off = obj
        if wide:
            self._minalign = 8
        return obj

    def file(self, f: FileMetadata) -> int:
        """One FileMetadata with its strings and xattrs, created in upstream's order."""
        chunks = self._chunks
        off = self._off
        ends = []
        for text in (f.name, f.type, f.linkname, f.uname, f.gname, f.mod_time):
            data = text.encode(_ENC, _FREE)
            n = len(data)
            pad = -(off + n + 1) & 3
            chunks.append(_pack_u32(n) + data + _ZEROS[pad + 1])
            off += n + pad + 5
            ends.append(off)
        self._off = off
        xattrs: list[int] = []
        if f.pax:
            # Go sorts the keys as byte strings.
            for kb, value in sorted((k.encode(_ENC, _FREE), v) for k, v in f.pax.items()):
                ko = self.string(kb)
                vo = self.string(bytes(value))
                xattrs.append(self.table(_XATTR_SIG, (ko, vo)))
        xvec = self.offset_vector(xattrs)
        uoff, usize, mode = f.uncompressed_offset, f.uncompressed_size, f.mode
        uid, gid, dmaj, dmin = f.uid, f.gid, f.devmajor, f.devminor
        # Scalars equal to their default (0) are left out, as Go's generated code does.
        mask = (
            (uoff != 0)
            | (usize != 0) << 1
            | (mode != 0) << 2
            | (uid != 0) << 3
            | (gid != 0) << 4
            | (dmaj != 0) << 5
            | (dmin != 0) << 6
        )
        name, typ, link, uname, gname, mtime = ends
        return self.table(
            _FILE_SIGS[mask], (name, typ, uoff, usize, link, mode, uid, gid, uname, gname, mtime, dmaj, dmin, xvec)
        )

    def finish(self, root: int) -> bytes:
        pad = -(self._off + 4) & (self._minalign - 1)
        self._chunks.append(_ZEROS[pad])
        self._off += pad + 4
        self._chunks.append(_pack_u32(self._off - root))
        self._chunks.reverse()
        return b"".join(self._chunks)


_Plan = tuple[Callable[..., bytes], list[tuple[int, int]], tuple[int, ...], bytes, int, bool]


def _plan_table(align: int, sig: tuple[tuple[int, str, int], ...]) -> _Plan:
    """Lay out a table as the Go builder would when it starts at an offset congruent to `align` mod 8."""
    o = align
    ends: dict[int, int] = {}
    written: list[tuple[str, int, int]] = []  # ("x", pad, 0) or (kind, value index, end), in write order
    for slot, kind, index in sig:
        size = _SIZE[kind]
        pad = -o & (size - 1)
        if pad:
            written.append(("x", pad, 0))
        o += pad + size
        ends[slot] = o - align
        written.append((kind, index, o - align))
    pad = -o & 3
    if pad:
        written.append(("x", pad, 0))
    size = o + pad + 4 - align
    # Memory order is the reverse of write order, after the soffset.
    fmt = ["<i"]
    spec: list[tuple[int, int]] = []
    for kind, index, end in reversed(written):
        if kind == "x":
            fmt.append(f"{index}x")
        else:
            fmt.append(_CODE[kind])
            spec.append((end if kind == "U" else 0, index))
    nslots = max(ends) + 1 if ends else 0
    entries = tuple(size - ends[i] if i in ends else 0 for i in range(nslots))
    vtable = struct.pack(f"<{nslots + 2}H", 2 * (nslots + 2), size, *entries)
    wide = any(_SIZE[kind] == 8 for _slot, kind, _i in sig)
    return struct.Struct("".join(fmt)).pack, spec, entries, vtable, size, wide


_XATTR_SIG = ((0, "U", 0), (1, "U", 1))
_FILE_OPTIONAL = {2: 0, 3: 1, 5: 2, 6: 3, 7: 4, 11: 5, 12: 6}  # slot -> bit in the presence mask
_FILE_SIGS = [
    tuple(
        (slot, _FILE_KINDS[slot], slot)
        for slot in range(14)
        if slot not in _FILE_OPTIONAL or mask >> _FILE_OPTIONAL[slot] & 1
    )
    for mask in range(128)
]


def encode(ztoc: Ztoc) -> bytes:
    """Serialize `ztoc` to the flatbuffer upstream SOCI writes for it (byte-identical).

    Text is encoded as UTF-8 with `surrogateescape` (the inverse of decode). Raises ZtocError for values the
    format cannot hold (integers out of range, unencodable text); consistency is decode()'s job.
    """
    try:
        algo = CompressionAlgorithm(ztoc.compression_algorithm)
    except ValueError:
        bad = ztoc.compression_algorithm
        raise ZtocError(f"cannot encode zTOC: unknown compression algorithm {bad!r}") from None
    collecting = gc.isenabled()
    gc.disable()
    try:
        b = _Builder()
        version = b.string(ztoc.version.encode(_ENC, _FREE))
        tool = b.string(ztoc.build_tool_identifier.encode(_ENC, _FREE))
        files = ztoc.files
        # Upstream builds the entries last to first so that the first entry ends up first in the buffer.
        offsets = [0] * len(files)
        for i in range(len(files) - 1, -1, -1):
            offsets[i] = b.file(files[i])
        toc = b.table(((0, "U", 0),), (b.offset_vector(offsets),))
        checkpoints = b.byte_vector(bytes(ztoc.checkpoints))
        spans = b.offset_vector([b.string(d.encode(_ENC, _FREE)) for d in ztoc.span_digests])
        sig: list[tuple[int, str, int]] = []
        if ztoc.max_span_id:
            sig.append((1, "i", 0))
        sig += [(2, "U", 1), (3, "U", 2)]
        if algo != CompressionAlgorithm.GZIP:
            sig.append((0, "b", 3))
        cinfo = b.table(tuple(sig), (ztoc.max_span_id, spans, checkpoints, int(algo)))
        sig = [(0, "U", 0), (1, "U", 1), (4, "U", 2)]
        if ztoc.compressed_archive_size:
            sig.append((2, "q", 3))
        if ztoc.uncompressed_archive_size:
            sig.append((3, "q", 4))
        sig.append((5, "U", 5))
        values = (version, tool, toc, ztoc.compressed_archive_size, ztoc.uncompressed_archive_size, cinfo)
        out = b.finish(b.table(tuple(sig), values))
    except (struct.error, UnicodeError, TypeError, AttributeError, OverflowError) as e:
        raise ZtocError(f"cannot encode zTOC: a field has an invalid value ({e})") from None
    finally:
        if collecting:
            gc.enable()
    if len(out) > MAX_ZTOC_SIZE:
        raise ZtocError(f"cannot encode zTOC: {len(out)} bytes exceeds the flatbuffer limit of 2 GiB")
    return out


# --------------------------------------------------------------------------------------------- decoding


class _Layout:
    """A validated vtable of one table type: field offsets, table size, and one struct read of all fields."""

    __slots__ = ("fos", "tsize", "unpack", "getter", "defaults")

    def __init__(self, fos: tuple[int, ...], tsize: int, unpack: Callable, getter: Callable, defaults: tuple):
        self.fos = fos
        self.tsize = tsize
        self.unpack = unpack
        # getter(unpack(buf, pos) + defaults) gives the values in slot order, defaults for absent slots.
        self.getter = getter
        self.defaults = defaults

    def read(self, buf: bytes, pos: int) -> tuple[int, ...]:
        values = self.getter(self.unpack(buf, pos) + self.defaults)
        return values if isinstance(values, tuple) else (values,)


def _make_layout(raw: bytes, kinds: tuple[str, ...], what: str) -> _Layout:
    """Validate a vtable (its table size then its field offsets for the schema's slots, as raw bytes
    known to lie inside the buffer) and compile a reader of all its fields."""
    (tsize,) = struct.unpack_from("<H", raw, 0)
    if tsize < 4:
        raise ZtocError(f"zTOC {what} vtable declares an invalid table size {tsize}")
    nslots = (len(raw) - 2) // 2
    fos = struct.unpack_from(f"<{nslots}H", raw, 2) + (0,) * (len(kinds) - nslots)
    present = sorted((fo, slot) for slot, fo in enumerate(fos) if fo)
    fmt = ["<4x"]  # the soffset to the vtable
    end = 4
    for fo, slot in present:
        size = _SIZE[kinds[slot]]
        if fo < end or fo + size > tsize:
            raise ZtocError(f"zTOC {what} vtable has a field at {fo} that overlaps or leaves its table")
        fmt.append(f"{fo - end}x{_CODE[kinds[slot]]}")
        end = fo + size
    unpack = struct.Struct("".join(fmt)).unpack_from
    # Absent slots read their schema default, appended after the present values.
    defaults = _DEFAULTS.get(kinds) or (0,) * len(kinds)
    order = [len(present) + slot for slot in range(len(kinds))]
    for k, (_fo, slot) in enumerate(present):
        order[slot] = k
    return _Layout(fos, tsize, unpack, itemgetter(*order), defaults)


class _Reader:
    """Bounds-checked access to one zTOC buffer; per-type vtable caches keyed by vtable position."""

    __slots__ = ("buf", "n", "caches", "compiled", "budget", "xattrs")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.n = len(buf)
        self.caches: dict[tuple[str, ...], dict[int, _Layout]] = {}
        # Layouts by vtable content: a writer that does not share vtables repeats the same few contents.
        self.compiled: dict[tuple[tuple[str, ...], bytes], _Layout] = {}
        # Strings may be referenced from many places in a hostile buffer; a well-formed one never shares
        # them, so all text read together cannot exceed the buffer size.
        self.budget = self.n
        self.xattrs = 0

    def layout(self, vt: int, kinds: tuple[str, ...], what: str) -> _Layout:
        """The validated layout of the vtable at `vt` for a table of `kinds`."""
        cache = self.caches.setdefault(kinds, {})
        lay = cache.get(vt)
        if lay is not None:
            return lay
        if vt < 0 or vt + 4 > self.n:
            raise ZtocError(f"zTOC {what} table points to a vtable outside the buffer")
        vtsize = _U16x2(self.buf, vt)[0]
        if vtsize < 4 or vtsize & 1 or vt + vtsize > self.n:
            raise ZtocError(f"zTOC {what} vtable has an invalid size {vtsize}")
        # Slots past the schema's are fields this reader does not know; they do not matter.
        key = (kinds, self.buf[vt + 2 : vt + min(vtsize, 4 + 2 * len(kinds))])
        lay = self.compiled.get(key)
        if lay is None:
            # Upstream's writer yields a few hundred layouts at most; more means a crafted buffer.
            if len(self.compiled) >= _MAX_LAYOUTS:
                raise ZtocError("zTOC has implausibly many distinct vtables")
            lay = self.compiled[key] = _make_layout(key[1], kinds, what)
        cache[vt] = lay
        return lay

    def table(self, pos: int, kinds: tuple[str, ...], what: str) -> tuple[_Layout, tuple[int, ...]]:
        if pos + 4 > self.n:
            raise ZtocError(f"zTOC {what} table lies outside the buffer")
        lay = self.layout(pos - _i32(self.buf, pos)[0], kinds, what)
        if pos + lay.tsize > self.n:
            raise ZtocError(f"zTOC {what} table lies outside the buffer")
        return lay, lay.read(self.buf, pos)

    def raw(self, pos: int, what: str, *, string: bool = True) -> bytes:
        """The bytes of the string (NUL-terminated, as the format requires) or byte vector at `pos`."""
        if pos + 4 > self.n:
            raise ZtocError(f"zTOC {what} lies outside the buffer")
        end = pos + 4 + _u32(self.buf, pos)[0]
        if end + string > self.n:
            raise ZtocError(f"zTOC {what} runs past the end of the buffer")
        if string and self.buf[end]:
            raise ZtocError(f"zTOC {what} is not NUL-terminated")
        self.budget -= end - pos
        if self.budget < 0:
            raise ZtocError("zTOC references more text than it contains (shared or looping references)")
        return self.buf[pos + 4 : end]

    def field_raw(self, tpos: int, fo: int, value: int, what: str, *, string: bool = True) -> bytes:
        return self.raw(tpos + fo + value, what, string=string) if fo else b""

    def offsets(self, pos: int, what: str) -> tuple[int, list[int]]:
        """Absolute positions of the elements of the offset vector at `pos`."""
        if pos + 4 > self.n:
            raise ZtocError(f"zTOC {what} vector lies outside the buffer")
        count = _u32(self.buf, pos)[0]
        start = pos + 4
        if start + 4 * count > self.n:
            raise ZtocError(f"zTOC {what} vector claims {count} elements, more than the buffer holds")
        rel = struct.unpack_from(f"<{count}I", self.buf, start)
        return count, [start + 4 * i + r for i, r in enumerate(rel)]


def _ascii(raw: bytes, what: str) -> str:
    if not raw.isascii():
        raise ZtocError(f"zTOC {what} is not ASCII")
    return raw.decode("ascii")


def decode(data: bytes | bytearray | memoryview) -> Ztoc:
    """Parse and validate an untrusted zTOC flatbuffer; raise ZtocError if it is malformed or inconsistent.

    Every offset, length and vtable is checked before use, and the text and xattrs read in total are capped
    by the buffer size, so shared or crafted references cannot amplify time or memory. Bytes after the
    flatbuffer (newer upstream appends prefetch metadata there) are ignored.

    Free-form text (names, link names, user and group names, PAX keys, the build tool identifier) may hold
    any bytes, as tar allows: it is decoded as UTF-8 with `surrogateescape`, so non-UTF-8 bytes come back
    as lone surrogates and `encode()` (or `os.fsencode`) restores them exactly. Fields with a fixed syntax
    (version, type, mod_time, span digests) must be ASCII. PAX values stay raw bytes; `checkpoints` is
    returned as the raw blob (required non-empty for gzip). Entries are returned in stored order, or
    sorted by data offset when stored out of order, as upstream does before its overlap check.
    """
    try:
        buf = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
    except (TypeError, ValueError) as e:
        raise ZtocError(f"zTOC data is not a contiguous byte buffer ({e})") from None
    if len(buf) < 8:
        raise ZtocError(f"zTOC is too short ({len(buf)} bytes) to be a flatbuffer")
    if len(buf) > MAX_ZTOC_SIZE:
        raise ZtocError(f"zTOC is {len(buf)} bytes, over the flatbuffer limit of 2 GiB")
    # Decoding creates hundreds of thousands of objects and no cycles; collector passes would only slow it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _decode(_Reader(buf))
    except struct.error:
        # Reads are bounds-checked before use; this only fires on a position the checks let through.
        raise ZtocError("zTOC has an offset pointing outside the buffer") from None
    except (IndexError, OverflowError, RecursionError) as e:
        raise ZtocError(f"zTOC is malformed ({type(e).__name__})") from None
    finally:
        if collecting:
            gc.enable()


def _decode_head(r: _Reader) -> tuple[Ztoc, list[int]]:
    """Everything but the entries (files left empty), and the buffer positions of the entries."""
    root = _u32(r.buf, 0)[0]
    zl, (version_o, tool_o, csize, usize, toc_o, cinfo_o) = r.table(root, _ZTOC_KINDS, "root")
    zf = zl.fos
    version = _ascii(r.field_raw(root, zf[0], version_o, "version"), "version")
    tool = r.field_raw(root, zf[1], tool_o, "build tool identifier").decode(_ENC, _FREE)
    if csize < 0 or usize < 0:
        raise ZtocError(f"zTOC has a negative archive size ({csize} compressed, {usize} uncompressed)")
    if not zf[4]:
        raise ZtocError("zTOC has no TOC")
    if not zf[5]:
        raise ZtocError("zTOC has no compression info")

    # Compression info first: it is small and its checks are cheap.
    cpos = root + zf[5] + cinfo_o
    cl, (algo_v, max_span_id, spans_o, ckpt_o) = r.table(cpos, _CINFO_KINDS, "compression info")
    algo = _ALGO_BY_VALUE.get(algo_v)
    if algo is None:
        raise ZtocError(f"zTOC has an unknown compression algorithm {algo_v}")
    if max_span_id < 0:
        raise ZtocError(f"zTOC has a negative max span id {max_span_id}")
    cf = cl.fos
    count, positions = r.offsets(cpos + cf[2] + spans_o, "span digests") if cf[2] else (0, [])
    if count != max_span_id + 1:
        want = max_span_id + 1
        raise ZtocError(f"zTOC has {count} span digests, but its max span id {max_span_id} implies {want}")
    span_digests = []
    for p in positions:
        d = _ascii(r.raw(p, "span digest"), "span digest")
        try:
            _digest.validate(d)
        except DigestError:
            raise ZtocError(f"zTOC has an invalid span digest {d[:80]!r}") from None
        span_digests.append(d)
    checkpoints = bytes(r.field_raw(cpos, cf[3], ckpt_o, "checkpoints", string=False))
    # A byte vector's bytes follow its 4-byte length.
    checkpoints_offset = cpos + cf[3] + ckpt_o + 4 if cf[3] else -1
    if algo == CompressionAlgorithm.GZIP and not checkpoints:
        raise ZtocError("zTOC for a gzip layer has no checkpoints")

    tpos = root + zf[4] + toc_o
    tl, (meta_o,) = r.table(tpos, _TOC_KINDS, "TOC")
    count, positions = r.offsets(tpos + tl.fos[0] + meta_o, "TOC metadata") if tl.fos[0] else (0, [])
    head = Ztoc(
        build_tool_identifier=tool,
        compressed_archive_size=csize,
        uncompressed_archive_size=usize,
        files=[],
        compression_algorithm=algo,
        max_span_id=max_span_id,
        span_digests=span_digests,
        checkpoints=checkpoints,
        version=version,
        checkpoints_offset=checkpoints_offset,
    )
    return head, positions


def _decode(r: _Reader) -> Ztoc:
    head, positions = _decode_head(r)
    head.files = _decode_files(r, positions, head.uncompressed_archive_size)
    return head


def _decode_files(r: _Reader, positions: list[int], usize: int) -> list[FileMetadata]:
    # The hot path of mounting. Per entry: one read of the soffset, one struct read of all scalar fields and
    # string offsets through a layout cached per vtable, then the strings; repeated texts come from caches.
    buf, n = r.buf, r.n
    i32, u32 = _i32, _u32
    enc, free = _ENC, _FREE
    plans: dict[int, tuple] = {}
    types = _TYPE_BY_RAW
    owners: dict[bytes, str] = {}
    times: dict[bytes, str] = {}
    mt_ok = _MOD_TIME_RE.fullmatch
    bad_string = "zTOC file entry has a string running past its end or the buffer's"
    files: list[FileMetadata] = []
    append = files.append
    text = 0
    next_header = 0
    ordered = True
    for pos in positions:
        # Positions are never negative here, so struct's own bounds check covers every read past the end.
        vt = pos - i32(buf, pos)[0]
        plan = plans.get(vt)
        if plan is None:
            plan = plans[vt] = _file_plan(r, vt)
        unpack, getter, defaults, sfos = plan
        values = getter(unpack(buf, pos) + defaults)
        name_o, type_o, off, size, link_o, mode, uid, gid, uname_o, gname_o, mt_o, dmaj, dmin, xa_o = values
        if sfos is None:
            name_b, type_b, link_b, uname_b, gname_b, mt_b, pax = _sparse_entry(r, pos, values)
        else:
            # Every string present (always so from upstream and from encode()); positions only grow from
            # `pos`, so a read past the end raises struct.error, which decode() reports.
            fn, ft, fl, fu, fg, fm, fx = sfos
            p = pos + fn + name_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            name_b = buf[p + 4 : e]
            p = pos + ft + type_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            type_b = buf[p + 4 : e]
            p = pos + fl + link_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            link_b = buf[p + 4 : e]
            p = pos + fu + uname_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            uname_b = buf[p + 4 : e]
            p = pos + fg + gname_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            gname_b = buf[p + 4 : e]
            p = pos + fm + mt_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            mt_b = buf[p + 4 : e]
            p = pos + fx + xa_o
            pax = _xattrs(r, p) if u32(buf, p)[0] else {}
        # A well-formed buffer never shares strings, so their sizes (with length and NUL) add up to < n.
        text += len(name_b) + len(type_b) + len(link_b) + len(uname_b) + len(gname_b) + len(mt_b) + 30
        if text > n:
            raise ZtocError("zTOC references more text than it contains (shared or looping references)")
        typ = types.get(type_b)
        if typ is None:
            raise ZtocError(f"zTOC entry has an unknown type {type_b[:40]!r}")
        uname = owners.get(uname_b)
        if uname is None:
            uname = owners[uname_b] = uname_b.decode(_ENC, _FREE)
        gname = owners.get(gname_b)
        if gname is None:
            gname = owners[gname_b] = gname_b.decode(_ENC, _FREE)
        mod_time = times.get(mt_b)
        if mod_time is None:
            if not mt_ok(mt_b):
                raise ZtocError(f"zTOC entry has an invalid modification time {mt_b[:40]!r}")
            mod_time = times[mt_b] = mt_b.decode("ascii")
        if off < 0 or size < 0 or off + size > usize:
            raise ZtocError(f"zTOC entry data [{off}, +{size}) lies outside the archive of {usize} bytes")
        if off < next_header:
            ordered = False
        next_header = (off + size + 511) & ~511
        append(
            FileMetadata(
                name_b.decode(enc, free),
                typ,
                off,
                size,
                link_b.decode(enc, free),
                mode,
                uid,
                gid,
                uname,
                gname,
                mod_time,
                dmaj,
                dmin,
                pax,
            )
        )
    r.budget -= text
    if r.budget < 0:
        raise ZtocError("zTOC references more text than it contains (shared or looping references)")
    if not ordered:
        _check_unordered(files)
    return files


def _file_plan(r: _Reader, vt: int) -> tuple:
    """For a FileMetadata vtable: (unpack, reorder, defaults, string and xattr field offsets, or None
    if one of them is absent)."""
    lay = r.layout(vt, _FILE_KINDS, "file entry")
    sfos = tuple(lay.fos[s] for s in _FILE_TEXT_SLOTS)
    return lay.unpack, lay.getter, lay.defaults, sfos if all(sfos) else None


def _sparse_entry(r: _Reader, pos: int, values: tuple[int, ...]) -> tuple:
    """The strings and xattrs of an entry whose vtable leaves some of them out (they read as empty)."""
    vt = pos - _i32(r.buf, pos)[0]
    fos = r.layout(vt, _FILE_KINDS, "file entry").fos
    out: list = []
    for slot in _FILE_TEXT_SLOTS[:6]:
        out.append(r.field_raw(pos, fos[slot], values[slot], "file entry string"))
    xfo = fos[13]
    out.append(_xattrs(r, pos + xfo + values[13]) if xfo else {})
    return tuple(out)


def _xattrs(r: _Reader, pos: int) -> dict[str, bytes]:
    count, xpos = r.offsets(pos, "xattrs")
    # Each xattr needs its own vector slot in a well-formed buffer, so all of them fit in n / 4.
    r.xattrs += count
    if 4 * r.xattrs > r.n:
        raise ZtocError("zTOC references more xattrs than it contains (shared references)")
    pax: dict[str, bytes] = {}
    for xp in xpos:
        xl, (k_o, v_o) = r.table(xp, _XATTR_KINDS, "xattr")
        key = r.field_raw(xp, xl.fos[0], k_o, "xattr key").decode(_ENC, _FREE)
        pax[key] = bytes(r.field_raw(xp, xl.fos[1], v_o, "xattr value"))
    return pax


def _check_unordered(files: list[FileMetadata]) -> None:
    # Upstream sorts the entries by data offset before recomputing header positions; do the same, so an
    # out-of-order TOC is accepted exactly when upstream accepts it.
    files.sort(key=lambda f: f.uncompressed_offset)
    next_header = 0
    for f in files:
        if f.uncompressed_offset < next_header:
            raise ZtocError(
                f"zTOC entry {f.name[:100]!r} at {f.uncompressed_offset} overlaps the previous entry's data"
            )
        next_header = (f.uncompressed_offset + f.uncompressed_size + 511) & ~511


# --------------------------------------------------------------------------------------------- raw entries

# (name, type, uncompressed_offset, uncompressed_size, linkname, mode, uid, gid, mod_time, devmajor, devminor,
# pax): name and linkname stay raw bytes, mod_time is the raw RFC 3339 text (b"" when absent), pax as in
# FileMetadata. uname and gname are checked but not returned: nothing that serves a layer needs them.
RawEntry = tuple[bytes, str, int, int, bytes, int, int, int, bytes, int, int, dict[str, bytes]]


class UnorderedEntries(Exception):
    """Raised by decode_raw's iterator after the last entry when they were stored out of data order.

    Upstream sorts such entries before its overlap check; a consumer that needs that order (or the check)
    falls back to decode(), which does both. Upstream's own writer never stores them out of order.
    """


def decode_raw(data: bytes | bytearray | memoryview) -> tuple[Ztoc, Iterator[RawEntry]]:
    """Like decode(), without materialising the entries: (zTOC with `files` empty, iterator of RawEntry).

    For a consumer that turns 100k entries into its own compact form: no FileMetadata objects, no text
    decoding, no list of all entries. The buffer is validated as decode() does (ZtocError from the call
    for the header, from the iterator for an entry); the iterator raises UnorderedEntries at the end when
    the entries were not stored in data order, in which case their overlap is not yet checked.
    """
    try:
        buf = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
    except (TypeError, ValueError) as e:
        raise ZtocError(f"zTOC data is not a contiguous byte buffer ({e})") from None
    if len(buf) < 8:
        raise ZtocError(f"zTOC is too short ({len(buf)} bytes) to be a flatbuffer")
    if len(buf) > MAX_ZTOC_SIZE:
        raise ZtocError(f"zTOC is {len(buf)} bytes, over the flatbuffer limit of 2 GiB")
    r = _Reader(buf)
    try:
        head, positions = _decode_head(r)
    except struct.error:
        raise ZtocError("zTOC has an offset pointing outside the buffer") from None
    except (IndexError, OverflowError, RecursionError) as e:
        raise ZtocError(f"zTOC is malformed ({type(e).__name__})") from None
    return head, RawEntries(r, positions, head.uncompressed_archive_size)


class RawEntries:
    """The iterator decode_raw returns. Before it is started, `split(k)` cuts it in two: entries [0, k) and
    [k, end), each checked on its own as the whole would be; `RawTail.finish` then checks the totals of
    both, and the caller the data order across the cut. For decoding the two parts in two processes (see
    forked.py)."""

    def __init__(self, r: _Reader, positions: list[int], usize: int) -> None:
        self._r, self._positions, self._usize = r, positions, usize
        self._it: Iterator[RawEntry] | None = None

    def __len__(self) -> int:
        return len(self._positions)

    def __iter__(self) -> RawEntries:
        return self

    def __next__(self) -> RawEntry:
        if self._it is None:
            self._it = _iter_raw(self._r, self._positions, self._usize)
        return next(self._it)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]

    def split(self, k: int) -> tuple[Iterator[RawEntry], RawTail]:
        if self._it is not None:
            raise ValueError("cannot split entries already being read")
        k = max(0, min(k, len(self._positions)))
        return (_iter_raw(self._r, self._positions[:k], self._usize),
                RawTail(self._r, self._positions[k:], self._usize))


class RawTail:
    """The entries after a split: `batches()` decodes them (in a child process, typically), `finish()` then
    applies what that read to the reader of the first part."""

    BATCH, END = 1, 2  # the kinds of what batches() yields

    def __init__(self, r: _Reader, positions: list[int], usize: int) -> None:
        self._r, self._positions, self._usize = r, positions, usize

    def batches(self, size: int) -> Iterator[tuple[int, Any]]:
        """Decode the entries (in a child process, typically): (BATCH, a list of up to `size` entries) for
        each batch, then (END, (usage, error)): usage = (text read, xattrs read, stored out of data order),
        error the message of an invalid entry, after the batches of every entry before it, or None."""
        r = self._r
        budget, xattrs = r.budget, r.xattrs
        batch: list[RawEntry] = []
        unordered, error = False, None
        try:
            for entry in _iter_raw(r, self._positions, self._usize):
                batch.append(entry)
                if len(batch) >= size:
                    yield self.BATCH, batch
                    batch = []
        except UnorderedEntries:
            unordered = True
        except ZtocError as exc:
            error = str(exc)
        if batch:
            yield self.BATCH, batch
        yield self.END, ((budget - r.budget, r.xattrs - xattrs, unordered), error)

    def finish(self, usage: tuple[int, int, bool]) -> bool:
        """In the process that read the first part (its reader is this one's): check the whole against the
        buffer once both parts are read, total text and xattrs within bounds. Returns whether the second part
        was out of data order (the cut between the parts is the caller's to check); raises ZtocError as
        decoding the whole would."""
        r = self._r
        text, xattrs, unordered = usage
        r.budget -= text
        if r.budget < 0:
            raise ZtocError("zTOC references more text than it contains (shared or looping references)")
        r.xattrs += xattrs
        if 4 * r.xattrs > r.n:
            raise ZtocError("zTOC references more xattrs than it contains (shared references)")
        return unordered


def _iter_raw(r: _Reader, positions: list[int], usize: int) -> Iterator[RawEntry]:
    try:
        yield from _raw_entries(r, positions, usize)
    except struct.error:
        raise ZtocError("zTOC has an offset pointing outside the buffer") from None
    except (IndexError, OverflowError, RecursionError) as e:
        raise ZtocError(f"zTOC is malformed ({type(e).__name__})") from None


def _raw_entries(r: _Reader, positions: list[int], usize: int) -> Iterator[RawEntry]:
    # The same checks as _decode_files, in the same order, minus the work whose result nobody reads here.
    buf, n = r.buf, r.n
    i32, u32 = _i32, _u32
    plans: dict[int, tuple] = {}
    types = _TYPE_BY_RAW
    times: dict[bytes, bytes] = {b"": b""}
    mt_ok = _MOD_TIME_RE.fullmatch
    bad_string = "zTOC file entry has a string running past its end or the buffer's"
    text = 0
    next_header = 0
    ordered = True
    for pos in positions:
        vt = pos - i32(buf, pos)[0]
        plan = plans.get(vt)
        if plan is None:
            plan = plans[vt] = _file_plan(r, vt)
        unpack, getter, defaults, sfos = plan
        values = getter(unpack(buf, pos) + defaults)
        name_o, type_o, off, size, link_o, mode, uid, gid, uname_o, gname_o, mt_o, dmaj, dmin, xa_o = values
        if sfos is None:
            name_b, type_b, link_b, uname_b, gname_b, mt_b, pax = _sparse_entry(r, pos, values)
            owners = len(uname_b) + len(gname_b)
        else:
            fn, ft, fl, fu, fg, fm, fx = sfos
            p = pos + fn + name_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            name_b = buf[p + 4 : e]
            p = pos + ft + type_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            type_b = buf[p + 4 : e]
            p = pos + fl + link_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            link_b = buf[p + 4 : e] if e > p + 4 else b""
            # Owner names: bounds and terminator checked, text not copied.
            p = pos + fu + uname_o
            owners = u32(buf, p)[0]
            e = p + 4 + owners
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            p = pos + fg + gname_o
            k = u32(buf, p)[0]
            e = p + 4 + k
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            owners += k
            p = pos + fm + mt_o
            e = p + 4 + u32(buf, p)[0]
            if e >= n or buf[e]:
                raise ZtocError(bad_string)
            mt_b = buf[p + 4 : e]
            p = pos + fx + xa_o
            pax = _xattrs(r, p) if u32(buf, p)[0] else {}
        text += len(name_b) + len(type_b) + len(link_b) + owners + len(mt_b) + 30
        if text > n:
            raise ZtocError("zTOC references more text than it contains (shared or looping references)")
        typ = types.get(type_b)
        if typ is None:
            raise ZtocError(f"zTOC entry has an unknown type {type_b[:40]!r}")
        # One shared object per distinct time: layers repeat a handful of them.
        mod_time = times.get(mt_b)
        if mod_time is None:
            if not mt_ok(mt_b):
                raise ZtocError(f"zTOC entry has an invalid modification time {mt_b[:40]!r}")
            mod_time = times[mt_b] = mt_b
        if off < 0 or size < 0 or off + size > usize:
            raise ZtocError(f"zTOC entry data [{off}, +{size}) lies outside the archive of {usize} bytes")
        if off < next_header:
            ordered = False
        next_header = (off + size + 511) & ~511
        yield name_b, typ, off, size, link_b, mode, uid, gid, mod_time, dmaj, dmin, pax
    r.budget -= text
    if r.budget < 0:
        raise ZtocError("zTOC references more text than it contains (shared or looping references)")
    if not ordered:
        raise UnorderedEntries("zTOC entries are not stored in data order")
