"""Tests of the zTOC flatbuffer codec: round trips, upstream layout compatibility, hostile input."""

from __future__ import annotations

import hashlib
import random
import struct
import time

import flatbuffers
import pytest
from flatbuffers import number_types as N
from flatbuffers.table import Table

from soci_helper.errors import ZtocError
from soci_helper.ztoc import codec
from soci_helper.ztoc.model import (
    BLOCK,
    CHAR,
    DIR,
    FIFO,
    HARDLINK,
    REG,
    SYMLINK,
    CompressionAlgorithm,
    FileMetadata,
    Ztoc,
    format_mod_time,
)

FS = "surrogateescape"


# ----------------------------------------------------------------------------------------- generators


def _digest(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


def _names(rng: random.Random, i: int) -> str:
    kind = i % 5
    if kind == 0:
        return f"usr/lib/file{i}.so"
    if kind == 1:
        return f"données/日本語/ファイル{i}"
    if kind == 2:
        # Not UTF-8 on disk: tar allows any bytes.
        return (b"latin1/caf\xe9-" + str(i).encode()).decode("utf-8", FS)
    if kind == 3:
        return "deep/" + "x" * rng.randint(100, 300) + f"/{i}"
    return f"etc/dir{i}/"


def make_ztoc(count: int = 40, seed: int = 1, *, algo: CompressionAlgorithm = CompressionAlgorithm.GZIP) -> Ztoc:
    """A zTOC laid out like a real tar: headers (some with PAX/GNU extras) then 512-aligned data."""
    rng = random.Random(seed)
    types = [REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO]
    files = []
    header = 0
    for i in range(count):
        typ = types[i % len(types)] if i % 3 else REG
        extra_headers = rng.choice([1, 1, 2, 3])
        off = header + 512 * extra_headers
        size = rng.choice([0, 1, 511, 512, 513, 100_000, 5 << 20]) if typ == REG else 0
        name = _names(rng, i)
        pax: dict[str, bytes] = {}
        if i % 4 == 0:
            pax["SCHILY.xattr.user.bin"] = bytes(range(256))
            pax["SCHILY.xattr.security.capability"] = b"\x01\x00\x00\x02"
        if i % 6 == 0:
            pax["path"] = name.encode("utf-8", FS)
            pax["mtime"] = b"1700000000.123456789"
            pax["LIBARCHIVE.xattr.user.ünï"] = "välue".encode()
        files.append(
            FileMetadata(
                name=name,
                type=typ,
                uncompressed_offset=off,
                uncompressed_size=size,
                linkname=files[0].name if typ == HARDLINK and files else ("../target" if typ == SYMLINK else ""),
                mode=rng.choice([0o644, 0o755, 0o104755, 0o1777, 0]),
                uid=rng.choice([0, 1000, 65534, 2**32 - 1]),
                gid=rng.choice([0, 1000, 2**31]),
                uname=rng.choice(["", "root", "ünïcode"]),
                gname=rng.choice(["", "wheel", "staff"]),
                mod_time=format_mod_time(1_700_000_000 + i, rng.choice([0, 1, 123456789, 500000000])),
                devmajor=rng.randint(1, 300) if typ in (CHAR, BLOCK) else 0,
                devminor=rng.randint(0, 2**20) if typ in (CHAR, BLOCK) else 0,
                pax=pax,
            )
        )
        header = (off + size + 511) & ~511
    spans = rng.randint(1, 5)
    return Ztoc(
        build_tool_identifier="AWS SOCI CLI v0.9.0",
        compressed_archive_size=rng.randint(1, 10**9),
        uncompressed_archive_size=header + 1024,
        files=files,
        compression_algorithm=algo,
        max_span_id=spans - 1,
        span_digests=[_digest(seed * 100 + k) for k in range(spans)],
        checkpoints=bytes(rng.getrandbits(8) for _ in range(300)),
    )


def make_big_ztoc(count: int) -> Ztoc:
    files = []
    header = 0
    for i in range(count):
        off = header + 512
        size = (i * 7919) % 20000 if i % 10 else 0
        files.append(
            FileMetadata(
                name=f"usr/share/pkg{i // 100}/file{i}.txt" if i % 10 else f"usr/share/pkg{i // 100}/d{i}/",
                type=REG if i % 10 else DIR,
                uncompressed_offset=off,
                uncompressed_size=size,
                mode=0o644 if i % 10 else 0o755,
                uname="root",
                gname="root",
                mod_time=format_mod_time(1_700_000_000, i % 3 * 250_000_000),
                pax={"SCHILY.xattr.user.k": b"v"} if i % 50 == 0 else {},
            )
        )
        header = (off + size + 511) & ~511
    return Ztoc(
        "AWS SOCI CLI v0.9.0",
        10**8,
        header + 1024,
        files,
        CompressionAlgorithm.GZIP,
        9,
        [_digest(k) for k in range(10)],
        b"\x01" * 1000,
    )


# -------------------------------------------------------------- reference marshaller (upstream's order)


def reference_encode(z: Ztoc) -> bytes:
    """Upstream's marshaller call sequence replayed through the stock flatbuffers Builder."""
    b = flatbuffers.Builder(0)

    def offsets_vector(offs: list[int]) -> int:
        b.StartVector(4, len(offs), 4)
        for o in reversed(offs):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    def file_table(f: FileMetadata) -> int:
        name, typ, link, uname, gname, mtime = (
            b.CreateString(s.encode("utf-8", FS)) for s in (f.name, f.type, f.linkname, f.uname, f.gname, f.mod_time)
        )
        xs = []
        for k in sorted(f.pax, key=lambda k: k.encode("utf-8", FS)):
            ko = b.CreateString(k.encode("utf-8", FS))
            vo = b.CreateString(f.pax[k])
            b.StartObject(2)
            b.PrependUOffsetTRelativeSlot(0, ko, 0)
            b.PrependUOffsetTRelativeSlot(1, vo, 0)
            xs.append(b.EndObject())
        xv = offsets_vector(xs)
        b.StartObject(14)
        b.PrependUOffsetTRelativeSlot(0, name, 0)
        b.PrependUOffsetTRelativeSlot(1, typ, 0)
        b.PrependInt64Slot(2, f.uncompressed_offset, 0)
        b.PrependInt64Slot(3, f.uncompressed_size, 0)
        b.PrependUOffsetTRelativeSlot(4, link, 0)
        b.PrependInt64Slot(5, f.mode, 0)
        b.PrependUint32Slot(6, f.uid, 0)
        b.PrependUint32Slot(7, f.gid, 0)
        b.PrependUOffsetTRelativeSlot(8, uname, 0)
        b.PrependUOffsetTRelativeSlot(9, gname, 0)
        b.PrependUOffsetTRelativeSlot(10, mtime, 0)
        b.PrependInt64Slot(11, f.devmajor, 0)
        b.PrependInt64Slot(12, f.devminor, 0)
        b.PrependUOffsetTRelativeSlot(13, xv, 0)
        return b.EndObject()

    version = b.CreateString(z.version)
    tool = b.CreateString(z.build_tool_identifier)
    offs = [0] * len(z.files)
    for i in range(len(z.files) - 1, -1, -1):
        offs[i] = file_table(z.files[i])
    meta = offsets_vector(offs)
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, meta, 0)
    toc = b.EndObject()
    ckpt = b.CreateByteVector(z.checkpoints)
    spans = offsets_vector([b.CreateString(d) for d in z.span_digests])
    b.StartObject(4)
    b.PrependInt32Slot(1, z.max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, spans, 0)
    b.PrependUOffsetTRelativeSlot(3, ckpt, 0)
    b.PrependInt8Slot(0, int(z.compression_algorithm), 1)
    cinfo = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(1, tool, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, z.compressed_archive_size, 0)
    b.PrependInt64Slot(3, z.uncompressed_archive_size, 0)
    b.PrependUOffsetTRelativeSlot(5, cinfo, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


# ------------------------------------------------------------- independent reader (generic Table API)


def _field(t: Table, slot: int) -> int:
    return t.Offset(4 + 2 * slot)


def _str(t: Table, slot: int) -> str:
    o = _field(t, slot)
    return t.String(o + t.Pos).decode("utf-8", FS) if o else ""


def _scalar(t: Table, slot: int, flags, default: int = 0) -> int:
    o = _field(t, slot)
    return t.Get(flags, o + t.Pos) if o else default


def _sub(t: Table, slot: int) -> Table:
    return Table(t.Bytes, t.Indirect(_field(t, slot) + t.Pos))


def _vec_tables(t: Table, slot: int) -> list[Table]:
    o = _field(t, slot)
    if not o:
        return []
    start = t.Vector(o)
    return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]


def generic_decode(buf: bytes) -> Ztoc:
    """Read every field by vtable slot with the flatbuffers runtime, as upstream's schema defines them."""
    root = Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
    files = []
    for e in _vec_tables(_sub(root, 4), 0):
        pax = {}
        for x in _vec_tables(e, 13):
            ko, vo = _field(x, 0), _field(x, 1)
            pax[x.String(ko + x.Pos).decode("utf-8", FS)] = bytes(x.String(vo + x.Pos))
        files.append(
            FileMetadata(
                _str(e, 0),
                _str(e, 1),
                _scalar(e, 2, N.Int64Flags),
                _scalar(e, 3, N.Int64Flags),
                _str(e, 4),
                _scalar(e, 5, N.Int64Flags),
                _scalar(e, 6, N.Uint32Flags),
                _scalar(e, 7, N.Uint32Flags),
                _str(e, 8),
                _str(e, 9),
                _str(e, 10),
                _scalar(e, 11, N.Int64Flags),
                _scalar(e, 12, N.Int64Flags),
                pax,
            )
        )
    ci = _sub(root, 5)
    so = _field(ci, 2)
    spans = [ci.String(ci.Vector(so) + 4 * i).decode() for i in range(ci.VectorLen(so))]
    co = _field(ci, 3)
    ckpt = bytes(buf[ci.Vector(co) : ci.Vector(co) + ci.VectorLen(co)])
    return Ztoc(
        build_tool_identifier=_str(root, 1),
        compressed_archive_size=_scalar(root, 2, N.Int64Flags),
        uncompressed_archive_size=_scalar(root, 3, N.Int64Flags),
        files=files,
        compression_algorithm=CompressionAlgorithm(_scalar(ci, 0, N.Int8Flags, 1)),
        max_span_id=_scalar(ci, 1, N.Int32Flags),
        span_digests=spans,
        checkpoints=ckpt,
        version=_str(root, 0),
    )


# ---------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", range(6))
def test_round_trip(seed: int) -> None:
    algo = CompressionAlgorithm.UNCOMPRESSED if seed % 3 == 2 else CompressionAlgorithm.GZIP
    z = make_ztoc(count=10 + 15 * seed, seed=seed, algo=algo)
    data = codec.encode(z)
    assert codec.decode(data) == z
    assert codec.decode(memoryview(data)) == z
    assert codec.decode(bytearray(data)) == z
    assert codec.encode(codec.decode(data)) == data


def test_round_trip_edge_values() -> None:
    files = [
        FileMetadata("", REG, 512, 0),  # every scalar at its default, every string empty
        FileMetadata(
            "big",
            REG,
            1024,
            2**40,
            mode=-1,
            uid=2**32 - 1,
            gid=2**32 - 1,
            devmajor=2**63 - 1,
            devminor=-(2**63),
            mod_time="2023-11-14T22:13:20.000000001Z",
            pax={"": b""},
        ),
    ]
    z = Ztoc("", 0, 2**40 + 4096, files, CompressionAlgorithm.GZIP, 0, [_digest(0)], b"\x00")
    assert codec.decode(codec.encode(z)) == z


def test_empty_toc() -> None:
    z = Ztoc("t", 10, 1024, [], CompressionAlgorithm.GZIP, 0, [_digest(1)], b"cp")
    assert codec.decode(codec.encode(z)) == z


def test_non_utf8_names_keep_their_bytes() -> None:
    z = make_ztoc(count=6, seed=3)
    raw = b"dir/\xff\xfe-not-utf8"
    z.files[2].name = raw.decode("utf-8", FS)
    z.files[2].pax = {b"SCHILY.xattr.user.\xe9".decode("utf-8", FS): b"\xff"}
    data = codec.encode(z)
    assert raw in data
    back = codec.decode(data)
    assert back.files[2].name.encode("utf-8", FS) == raw
    assert back == z


def test_unordered_entries_are_sorted_like_upstream() -> None:
    z = make_ztoc(count=8, seed=4)
    shuffled = Ztoc(**{f: getattr(z, f) for f in Ztoc.__dataclass_fields__})
    shuffled.files = list(reversed(z.files))
    assert codec.decode(codec.encode(shuffled)).files == z.files


# ---------------------------------------------------------------------------- upstream compatibility


@pytest.mark.parametrize("seed", range(8))
def test_bytes_match_reference_marshaller(seed: int) -> None:
    algo = CompressionAlgorithm.UNCOMPRESSED if seed % 4 == 3 else CompressionAlgorithm.GZIP
    z = make_ztoc(count=5 + 20 * seed, seed=seed, algo=algo)
    assert codec.encode(z) == reference_encode(z)


@pytest.mark.parametrize("seed", range(4))
def test_generic_reader_agrees(seed: int) -> None:
    z = make_ztoc(count=30, seed=seed + 10)
    data = codec.encode(z)
    assert generic_decode(data) == z
    # And our decoder reads the stock builder's output.
    assert codec.decode(reference_encode(z)) == z


def test_gzip_algorithm_is_left_at_its_default() -> None:
    # Upstream never writes compression_algorithm for gzip (it equals the schema default).
    z = make_ztoc(count=3, seed=2)
    root = Table(codec.encode(z), 0)
    root = Table(root.Bytes, flatbuffers.encode.Get(flatbuffers.packer.uoffset, root.Bytes, 0))
    assert _field(_sub(root, 5), 0) == 0
    z.compression_algorithm = CompressionAlgorithm.UNCOMPRESSED
    root = Table(codec.encode(z), 0)
    root = Table(root.Bytes, flatbuffers.encode.Get(flatbuffers.packer.uoffset, root.Bytes, 0))
    assert _scalar(_sub(root, 5), 0, N.Int8Flags) == 2


def test_prefetch_trailer_is_ignored() -> None:
    # Newer upstream appends a separator and JSON after the flatbuffer; offsets never reach it.
    z = make_ztoc(count=5, seed=5)
    assert codec.decode(codec.encode(z) + b"---SOCI-PREFETCH---[]") == z


# --------------------------------------------------------------------------------------- hostile input


def _expect_error(data: bytes) -> ZtocError:
    start = time.perf_counter()
    with pytest.raises(ZtocError) as info:
        codec.decode(data)
    assert time.perf_counter() - start < 2.0
    msg = str(info.value)
    assert msg and "\n" not in msg
    return info.value


def _decodes_or_rejects(data: bytes) -> None:
    start = time.perf_counter()
    try:
        codec.decode(data)
    except ZtocError:
        pass
    assert time.perf_counter() - start < 2.0


def _small() -> tuple[Ztoc, bytes]:
    z = make_ztoc(count=4, seed=7)
    return z, codec.encode(z)


def test_every_truncation_is_rejected() -> None:
    _z, data = _small()
    for length in range(len(data)):
        _expect_error(data[:length])


def test_random_byte_flips_never_escape() -> None:
    _z, data = _small()
    rng = random.Random(1234)
    for _ in range(3000):
        buf = bytearray(data)
        for _ in range(rng.choice([1, 1, 2, 8])):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        _decodes_or_rejects(bytes(buf))


def test_random_word_flips_never_escape() -> None:
    # Offsets and lengths are 32-bit words: overwrite aligned words with extreme values.
    _z, data = _small()
    rng = random.Random(99)
    for pos in range(0, len(data) - 3, 4):
        for value in (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, rng.getrandbits(32), len(data), pos):
            buf = bytearray(data)
            struct.pack_into("<I", buf, pos, value)
            _decodes_or_rejects(bytes(buf))


def test_garbage_and_tiny_inputs() -> None:
    rng = random.Random(5)
    for size in (0, 1, 4, 7, 8, 16, 64, 1000):
        _expect_error(bytes(size))
        _decodes_or_rejects(bytes(rng.getrandbits(8) for _ in range(size)))
    _expect_error(b"\xff" * 64)


def test_root_offset_outside() -> None:
    _z, data = _small()
    _expect_error(struct.pack("<I", len(data) + 100) + data[4:])
    _expect_error(struct.pack("<I", 0xFFFFFFFC) + data[4:])


def _craft(
    *,
    entries: int = 1,
    name: bytes = b"f",
    typ: bytes = b"reg",
    offset: int = 512,
    size: int = 10,
    mod_time: bytes = b"2023-11-14T22:13:20Z",
    algo: int = 1,
    max_span_id: int = 0,
    digests: list[bytes] | None = None,
    checkpoints: bytes = b"cp",
    usize: int = 4096,
    csize: int = 100,
    omit: tuple[int, ...] = (),
) -> bytes:
    """A buffer whose TOC lists the same FileMetadata table `entries` times (a legal but shared layout)."""
    b = flatbuffers.Builder(0)
    version = b.CreateString("0.9")
    strs = [b.CreateString(s) for s in (name, typ, b"", b"", b"", mod_time)]
    b.StartVector(4, 0, 4)
    xv = b.EndVector()
    b.StartObject(14)
    for slot, s in zip((0, 1, 4, 8, 9, 10), strs, strict=True):
        if slot not in omit:
            b.PrependUOffsetTRelativeSlot(slot, s, 0)
    b.PrependInt64Slot(2, offset, 0)
    b.PrependInt64Slot(3, size, 0)
    if 13 not in omit:
        b.PrependUOffsetTRelativeSlot(13, xv, 0)
    entry = b.EndObject()
    b.StartVector(4, entries, 4)
    for _ in range(entries):
        b.PrependUOffsetTRelative(entry)
    meta = b.EndVector()
    b.StartObject(1)
    b.PrependUOffsetTRelativeSlot(0, meta, 0)
    toc = b.EndObject()
    ckpt = b.CreateByteVector(checkpoints)
    ds = [b.CreateString(d) for d in (digests if digests is not None else [_digest(0).encode()])]
    b.StartVector(4, len(ds), 4)
    for d in reversed(ds):
        b.PrependUOffsetTRelative(d)
    spans = b.EndVector()
    b.StartObject(4)
    b.PrependInt32Slot(1, max_span_id, 0)
    b.PrependUOffsetTRelativeSlot(2, spans, 0)
    b.PrependUOffsetTRelativeSlot(3, ckpt, 0)
    b.PrependInt8Slot(0, algo, 1)
    cinfo = b.EndObject()
    b.StartObject(6)
    b.PrependUOffsetTRelativeSlot(0, version, 0)
    b.PrependUOffsetTRelativeSlot(4, toc, 0)
    b.PrependInt64Slot(2, csize, 0)
    b.PrependInt64Slot(3, usize, 0)
    b.PrependUOffsetTRelativeSlot(5, cinfo, 0)
    b.Finish(b.EndObject())
    return bytes(b.Output())


def test_crafted_baseline_is_valid() -> None:
    z = codec.decode(_craft())
    assert [f.name for f in z.files] == ["f"]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"algo": 3}, "compression algorithm"),
        ({"algo": -1}, "compression algorithm"),
        ({"max_span_id": 2}, "span digests"),
        ({"digests": []}, "span digests"),
        ({"max_span_id": -1, "digests": []}, "negative"),
        ({"digests": [b"sha256:abc"]}, "digest"),
        ({"digests": [b"md5:" + b"0" * 32]}, "digest"),
        ({"digests": ["sha256:" + "é" * 32]}, "ASCII"),
        ({"typ": b"socket"}, "type"),
        ({"typ": b""}, "type"),
        ({"mod_time": b"yesterday"}, "modification time"),
        ({"mod_time": "2023-11-14T22:13:20Z\u00e9".encode()}, "modification time"),
        ({"size": -1}, "archive"),
        ({"offset": -512}, "archive"),
        ({"offset": 4000, "size": 200}, "archive"),
        ({"usize": -5}, "negative"),
        ({"csize": -5}, "negative"),
        ({"checkpoints": b""}, "checkpoints"),
        ({"entries": 2}, "overlaps"),
        ({"entries": 3000, "name": b"n" * 2000, "usize": 1 << 40}, "more text"),
    ],
)
def test_crafted_inconsistencies(kwargs: dict, needle: str) -> None:
    err = _expect_error(_craft(**kwargs))
    assert needle in str(err)


def test_absent_fields_read_as_defaults() -> None:
    # Another writer may leave out empty strings and vectors; they read as "" and {} like upstream's reader.
    f = codec.decode(_craft(omit=(4, 8, 9, 13), entries=1)).files[0]
    assert (f.name, f.linkname, f.uname, f.gname, f.pax) == ("f", "", "", "", {})
    f = codec.decode(_craft(omit=(0, 10))).files[0]
    assert (f.name, f.mod_time, f.type) == ("", "", REG)
    assert "type" in str(_expect_error(_craft(omit=(1,))))


def test_uncompressed_layer_may_have_no_checkpoints() -> None:
    z = codec.decode(_craft(algo=2, checkpoints=b""))
    assert z.compression_algorithm == CompressionAlgorithm.UNCOMPRESSED


def test_overlapping_and_past_end_entries() -> None:
    z = make_ztoc(count=6, seed=8)
    z.files[0].uncompressed_size = 1000
    z.files[1].uncompressed_offset = z.files[0].uncompressed_offset + 512
    _expect_error(codec.encode(z))
    z = make_ztoc(count=6, seed=8)
    z.files[-1].uncompressed_size = z.uncompressed_archive_size
    _expect_error(codec.encode(z))
    z = make_ztoc(count=6, seed=8)
    z.uncompressed_archive_size = z.files[-1].uncompressed_offset - 1
    _expect_error(codec.encode(z))


def test_extra_headers_make_gaps_not_errors() -> None:
    # A PAX header plus a GNU long name push the data 1536 bytes after the header: fine.
    files = [
        FileMetadata("a", REG, 512, 100),
        FileMetadata("b" * 200, REG, 1024 + 1536, 0),
        FileMetadata("c", REG, 1024 + 2048, 3),
    ]
    z = Ztoc("t", 1, 8192, files, CompressionAlgorithm.GZIP, 0, [_digest(2)], b"c")
    assert codec.decode(codec.encode(z)) == z


def _patch_u32(data: bytes, pos: int, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into("<I", buf, pos, value)
    return bytes(buf)


def _toc_vector_pos(data: bytes) -> int:
    root = Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
    toc = _sub(root, 4)
    return toc.Vector(_field(toc, 0)) - 4


def test_huge_vector_lengths() -> None:
    _z, data = _small()
    pos = _toc_vector_pos(data)
    for count in (0xFFFFFFFF, 0x40000000, len(data)):
        assert "vector" in str(_expect_error(_patch_u32(data, pos, count)))


def test_vtable_loops_and_bad_vtables() -> None:
    _z, data = _small()
    root = flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0)
    # soffset 0: the vtable is the table itself.
    _decodes_or_rejects(_patch_u32(data, root, 0))
    # vtable before the buffer start and after its end.
    _expect_error(_patch_u32(data, root, root + 8))
    _expect_error(_patch_u32(data, root, (-(len(data) + 8)) & 0xFFFFFFFF))
    # vtable claiming a huge size and a field past its table.
    vt = root - struct.unpack_from("<i", data, root)[0]
    buf = bytearray(data)
    struct.pack_into("<HH", buf, vt, 0xFFFE, 4)
    _expect_error(bytes(buf))
    buf = bytearray(data)
    struct.pack_into("<H", buf, vt + 2, 5)
    _expect_error(bytes(buf))
    # A TOC entry pointing back at the root table: read as a file entry, it does not fit.
    pos = _toc_vector_pos(data)
    _decodes_or_rejects(_patch_u32(data, pos + 4, (root - (pos + 4)) & 0xFFFFFFFF))


def test_non_bytes_input() -> None:
    with pytest.raises(ZtocError):
        codec.decode(memoryview(b"\x00" * 16).cast("I"))  # decoded as bytes: too short to be valid
    with pytest.raises(ZtocError):
        codec.decode("not bytes")  # type: ignore[arg-type]


def test_encode_rejects_bad_values() -> None:
    z = make_ztoc(count=2, seed=1)
    z.files[0].uid = -1
    with pytest.raises(ZtocError):
        codec.encode(z)
    z = make_ztoc(count=2, seed=1)
    z.files[0].name = "\ud800bad"
    with pytest.raises(ZtocError):
        codec.encode(z)


# ------------------------------------------------------------------------------------------ performance


def test_100k_entries_timing(capsys: pytest.CaptureFixture[str]) -> None:
    z = make_big_ztoc(100_000)
    t0 = time.perf_counter()
    data = codec.encode(z)
    t1 = time.perf_counter()
    back = codec.decode(data)
    t2 = time.perf_counter()
    assert back == z
    with capsys.disabled():
        print(f"\n100k-entry zTOC ({len(data)} bytes): encode {t1 - t0:.3f} s, decode {t2 - t1:.3f} s")
