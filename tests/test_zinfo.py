"""Checkpoint blob and TarZinfo parsing, validation, span arithmetic and serialization."""

from __future__ import annotations

import os
import struct

import flatbuffers
import pytest
from flatbuffers import encode, number_types, packer, table
from support.gzipdata import gzip_stdin

from soci_helper.errors import ZtocError
from soci_helper.ztoc.gzip_index import GzipIndexer
from soci_helper.ztoc.zinfo import CHECKPOINT_SIZE, HEADER_SIZE, GzipZinfo, TarZinfo

SPAN = 64 << 10


@pytest.fixture(scope="module")
def layer() -> bytes:
    # Text-like data with some incompressible stretches: leftover bits vary from span to span.
    words = b" ".join(b"%d-%x" % (i * 7919 % 100_003, i) for i in range(200_000))
    data = words[:600_000] + os.urandom(100_000) + words[600_000:]
    return gzip_stdin(data, "-6")  # from stdin: a bare 10-byte header, as the older layout assumed


@pytest.fixture(scope="module")
def built(layer: bytes) -> tuple[bytes, int, int]:
    ix = GzipIndexer(SPAN)
    for i in range(0, len(layer), 65536):
        ix.feed(layer[i:i + 65536])
    r = ix.finish()
    return r.checkpoints, r.compressed_size, r.uncompressed_size


def points(blob: bytes) -> list[tuple[int, int, int]]:
    (n,) = struct.unpack_from("<i", blob, 0)
    return [struct.unpack_from("<qqB", blob, HEADER_SIZE + k * CHECKPOINT_SIZE) for k in range(n)]


def patch(blob: bytes, k: int, *, comp: int | None = None, out: int | None = None,
          bits: int | None = None) -> bytes:
    b = bytearray(blob)
    off = HEADER_SIZE + k * CHECKPOINT_SIZE
    c, o, bt = struct.unpack_from("<qqB", b, off)
    struct.pack_into("<qqB", b, off, c if comp is None else comp, o if out is None else out,
                     bt if bits is None else bits)
    return bytes(b)


def legacy_of(blob: bytes) -> bytes:
    """The older layout: same count, checkpoint 0 left out."""
    return blob[:HEADER_SIZE] + blob[HEADER_SIZE + CHECKPOINT_SIZE:]


def test_current_layout_fields(built: tuple[bytes, int, int]) -> None:
    blob, csize, usize = built
    z = GzipZinfo(blob, csize, usize)
    pts = points(blob)
    assert z.span_size == SPAN and not z.legacy
    assert z.num_spans == len(pts) == z.max_span_id + 1 > 8
    assert [(a, b, c) for a, b, c in zip(z.ins, z.outs, z.bits, strict=True)] == pts
    assert pts[0] == (10, 0, 0) and bytes(z.window(0)) == bytes(32768)
    assert any(z.bits)
    assert z.to_bytes() == blob
    w = z.window(3)
    assert isinstance(w, memoryview) and len(w) == 32768
    off = HEADER_SIZE + 3 * CHECKPOINT_SIZE + 17
    assert bytes(w) == blob[off:off + 32768]


def test_legacy_layout_parses_and_reserializes_current(built: tuple[bytes, int, int]) -> None:
    blob, csize, usize = built
    old = GzipZinfo(legacy_of(blob), csize, usize)
    new = GzipZinfo(blob, csize, usize)
    assert old.legacy
    assert (old.ins, old.outs, old.bits, old.num_spans) == (new.ins, new.outs, new.bits, new.num_spans)
    for i in range(new.num_spans):
        assert bytes(old.window(i)) == bytes(new.window(i))
        assert old.compressed_range(i) == new.compressed_range(i)
    assert old.to_bytes() == blob


@pytest.mark.parametrize("legacy", [False, True])
def test_windows_read_from_the_file_equal_the_blobs_and_are_checked(built, tmp_path, legacy: bool) -> None:
    blob, csize, usize = built
    blob = legacy_of(blob) if legacy else blob
    path = tmp_path / "ztoc"
    path.write_bytes(b"x" * 123 + blob + b"tail")  # the blob inside a bigger file, as in an encoded zTOC
    mem = GzipZinfo(blob, csize, usize)
    disk = GzipZinfo(blob, csize, usize)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ZtocError, match="does not hold"):
            disk.windows_from_file(fd, 122)
        assert not disk.windows_in_file
        disk.windows_from_file(fd, 123)
        assert disk.windows_in_file and len(disk.raw) == 0
        for i in range(mem.num_spans):
            assert bytes(disk.window(i)) == bytes(mem.window(i))
        assert disk.to_bytes() == mem.to_bytes()
        # The file changes afterwards: the window's crc32 refuses it.
        k = 2 if legacy else 3
        with open(path, "r+b") as f:
            f.seek(123 + HEADER_SIZE + (k - legacy) * CHECKPOINT_SIZE + 17 + 5000)
            f.write(b"\x00\xff")
        with pytest.raises(ZtocError, match=f"window {k - legacy} changed"):
            disk.window(k)
        assert bytes(disk.window(k + 1)) == bytes(mem.window(k + 1))
        with pytest.raises(ZtocError, match="changed"):
            disk.to_bytes()
    finally:
        os.close(fd)


def test_span_ranges(built: tuple[bytes, int, int]) -> None:
    blob, csize, usize = built
    z = GzipZinfo(blob, csize, usize)
    last = z.num_spans - 1
    for i in range(z.num_spans):
        cs, ce = z.compressed_range(i)
        assert cs == z.ins[i] - (1 if z.bits[i] else 0)
        assert ce == (z.ins[i + 1] if i < last else csize)
        us, ue = z.uncompressed_range(i)
        assert (us, ue) == (z.outs[i], z.outs[i + 1] if i < last else usize)
        assert z.span_of(us) == i and z.span_of(ue - 1) == i
    assert z.span_of(0) == 0
    unsized = GzipZinfo(blob)
    assert unsized.compressed_range(last)[1] is None and unsized.uncompressed_range(last)[1] is None
    assert unsized.span_of(usize * 10) == last
    for bad in (-1, usize):
        with pytest.raises(ZtocError):
            z.span_of(bad)
    for bad in (-1, z.num_spans):
        with pytest.raises(ZtocError):
            z.compressed_range(bad)
        with pytest.raises(ZtocError):
            z.window(bad)


def test_huge_blob_is_not_copied(built: tuple[bytes, int, int]) -> None:
    blob = built[0]
    z = GzipZinfo(memoryview(blob))
    assert z.window(1).obj is blob


@pytest.mark.parametrize("case", [
    "empty", "short_header", "truncated", "one_extra_byte", "zero_count", "negative_count", "huge_count",
    "count_too_small", "zero_span", "negative_span", "in_out_of_order", "in_equal", "out_out_of_order",
    "out_equal", "bits_8", "bits_255", "first_out_nonzero", "negative_in", "bits_without_byte",
])
def test_malformed_blobs(built: tuple[bytes, int, int], case: str) -> None:
    blob, _, _ = built
    n = len(points(blob))
    p = points(blob)
    bad = {
        "empty": lambda: b"",
        "short_header": lambda: blob[:11],
        "truncated": lambda: blob[:-1],
        "one_extra_byte": lambda: blob + b"\0",
        "zero_count": lambda: struct.pack("<iq", 0, SPAN),
        "negative_count": lambda: struct.pack("<iq", -1, SPAN) + blob[HEADER_SIZE:],
        "huge_count": lambda: struct.pack("<iq", 2**31 - 1, SPAN) + blob[HEADER_SIZE:],
        "count_too_small": lambda: struct.pack("<iq", n - 2, SPAN) + blob[HEADER_SIZE:],
        "zero_span": lambda: struct.pack("<iq", n, 0) + blob[HEADER_SIZE:],
        "negative_span": lambda: struct.pack("<iq", n, -5) + blob[HEADER_SIZE:],
        "in_out_of_order": lambda: patch(blob, 3, comp=p[2][0] - 1),
        "in_equal": lambda: patch(blob, 3, comp=p[2][0]),
        "out_out_of_order": lambda: patch(blob, 3, out=p[2][1] - 1),
        "out_equal": lambda: patch(blob, 3, out=p[2][1]),
        "bits_8": lambda: patch(blob, 2, bits=8),
        "bits_255": lambda: patch(blob, 2, bits=255),
        "first_out_nonzero": lambda: patch(blob, 0, out=1),
        "negative_in": lambda: patch(blob, 0, comp=-10),
        "bits_without_byte": lambda: patch(blob, 0, comp=0, bits=3),
    }[case]()
    with pytest.raises(ZtocError) as e:
        GzipZinfo(bad)
    msg = str(e.value)
    assert msg and "\n" not in msg


def test_offsets_beyond_layer_sizes(built: tuple[bytes, int, int]) -> None:
    blob, csize, usize = built
    p = points(blob)
    with pytest.raises(ZtocError, match="compressed"):
        GzipZinfo(blob, compressed_size=p[-1][0] - 1)
    with pytest.raises(ZtocError, match="uncompressed"):
        GzipZinfo(blob, uncompressed_size=p[-1][1] - 1)
    GzipZinfo(blob, compressed_size=csize, uncompressed_size=usize)


def test_empty_first_blocks_allow_repeated_zero_offsets() -> None:
    # Upstream's rule checkpoints every block boundary while nothing was output yet.
    w = bytes(32768)
    blob = (struct.pack("<iq", 3, SPAN) + struct.pack("<qqB", 10, 0, 0) + w
            + struct.pack("<qqB", 12, 0, 6) + w + struct.pack("<qqB", 900, 70000, 1) + w)
    z = GzipZinfo(blob)
    assert z.span_of(0) == 1 and z.span_of(69999) == 1 and z.span_of(70000) == 2


def test_tar_zinfo_roundtrip_and_schema() -> None:
    z = TarZinfo(span_size=4 << 20, size=(10 << 20) + 5)
    data = z.to_bytes()
    # Read it back with the flatbuffers runtime's generic table reader: slots 0, 1, 2 of the root.
    pos = encode.Get(packer.uoffset, data, 0)
    tab = table.Table(bytearray(data), pos)

    def slot(i: int, flags: type, default: int) -> int:
        o = tab.Offset(4 + 2 * i)
        return tab.Get(flags, o + tab.Pos) if o else default

    nt = number_types
    assert slot(0, nt.Int32Flags, 0) == 2
    assert slot(1, nt.Int64Flags, 0) == 4 << 20
    assert slot(2, nt.Int64Flags, 0) == (10 << 20) + 5
    back = TarZinfo.from_bytes(data, size=(10 << 20) + 5)
    assert (back.version, back.span_size, back.size) == (2, 4 << 20, (10 << 20) + 5)
    assert back.to_bytes() == data
    assert back.num_spans == 3 and back.max_span_id == 2
    assert back.uncompressed_range(2) == (8 << 20, (10 << 20) + 5) == back.compressed_range(2)
    assert back.span_of((8 << 20) - 1) == 1
    exact = TarZinfo(span_size=1024, size=4096)
    assert exact.num_spans == 4 and TarZinfo(span_size=1024, size=0).num_spans == 0


def test_tar_zinfo_malformed() -> None:
    good = TarZinfo(span_size=1 << 20, size=5 << 20).to_bytes()
    with pytest.raises(ZtocError, match="5242880-byte layer"):
        TarZinfo.from_bytes(good, size=1)
    b = flatbuffers.Builder(0)
    b.StartObject(3)
    b.PrependInt32Slot(0, 1, 0)
    b.PrependInt64Slot(1, 100, 0)
    b.Finish(b.EndObject())
    with pytest.raises(ZtocError, match="version"):
        TarZinfo.from_bytes(bytes(b.Output()))
    b = flatbuffers.Builder(0)
    b.StartObject(3)
    b.PrependInt32Slot(0, 2, 0)
    b.Finish(b.EndObject())
    with pytest.raises(ZtocError, match="span size"):
        TarZinfo.from_bytes(bytes(b.Output()))
    for junk in (b"", good[:6], b"\xff" * 24, bytes(good[:4]) + b"\x00" * 4, os.urandom(3),
                 struct.pack("<I", 1 << 30) + good[4:]):
        with pytest.raises(ZtocError):
            TarZinfo.from_bytes(junk)
