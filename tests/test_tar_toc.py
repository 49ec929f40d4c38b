"""Tests for the streaming tar TOC parser, checked against GNU tar listings and tarfile on real layers."""

from __future__ import annotations

import io
import os
import random
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.layers import (
    BIG_FILE_NAME,
    BIG_FILE_SIZE,
    CAPABILITY_XATTR,
    DUPLICATE_NAME,
    edge_case_layer,
    real_files_layer,
)

from soci_helper.errors import LayerError
from soci_helper.ztoc.model import FileMetadata
from soci_helper.ztoc.tar_toc import MAX_SPECIAL_SIZE, TarTocParser, TocResult, parse_tar_toc

_TYPE_CHARS = {
    "reg": "-", "dir": "d", "symlink": "l", "hardlink": "h", "char": "c", "block": "b", "fifo": "p",
}
_ENV = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}


# ---------------------------------------------------------------------------------------------- helpers


def _chunks(data: bytes, sizes: Iterator[int]) -> Iterator[memoryview]:
    mv = memoryview(data)
    pos = 0
    while pos < len(mv):
        n = next(sizes)
        yield mv[pos : pos + n]
        pos += n


def _fixed(n: int) -> Iterator[int]:
    while True:
        yield n


def _random_sizes(seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        yield rng.choice((1, 7, 100, 511, 512, 513, 1023, 4096, 65536, 200_000))


def _parse(data: bytes, chunk: int | None = None, **kwargs: bool) -> TocResult:
    parser = TarTocParser(**kwargs)
    if chunk is None:
        parser.feed(data)
    else:
        for piece in _chunks(data, _fixed(chunk)):
            parser.feed(piece)
    return parser.finish()


_ESCAPES = {"\\": b"\\", "n": b"\n", "t": b"\t", "a": b"\a", "b": b"\b", "f": b"\f", "r": b"\r", "v": b"\v",
            " ": b" ", "?": b"?"}


def _unescape(text: str) -> str:
    """Undo GNU tar's `escape` quoting (C escapes, octal for other bytes) back to the stored name."""
    raw = text.encode("utf-8", "surrogateescape")
    out = re.sub(
        rb"\\([0-7]{3}|.)",
        lambda m: bytes([int(m.group(1), 8)]) if len(m.group(1)) == 3 else _ESCAPES[m.group(1).decode()],
        raw,
    )
    return out.decode("utf-8", "surrogateescape")


def _gnu_listing(path: Path, numeric: bool) -> list[dict[str, str]]:
    args = ["tar", "--full-time", "--quoting-style=escape", "-tvf", str(path)]
    if numeric:
        args.insert(1, "--numeric-owner")
    proc = subprocess.run(args, capture_output=True, env=_ENV, check=True)
    rows = []
    for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
        perm, owner, size, day, clock, rest = line.split(None, 5)
        link = ""
        if perm[0] == "l":
            rest, link = rest.split(" -> ", 1)
        elif perm[0] == "h":
            rest, link = rest.split(" link to ", 1)
        rows.append({"perm": perm, "owner": owner, "size": size, "time": f"{day} {clock}",
                     "name": _unescape(rest), "link": _unescape(link)})
    return rows


def _gnu_end_of_archive(path: Path) -> int:
    """Where GNU tar sees the end: `-R` reports the first zero block's number; the marker is two blocks."""
    proc = subprocess.run(["tar", "-tRf", str(path)], capture_output=True, env=_ENV, check=True)
    last = proc.stdout.decode("utf-8", "surrogateescape").splitlines()[-1]
    m = re.fullmatch(r"block (\d+): \*\* (End of File|Block of NULs) \*\*", last)
    assert m, last
    return (int(m.group(1)) + 2) * 512


def _compare_with_gnu_tar(path: Path, files: list[FileMetadata]) -> None:
    names = _gnu_listing(path, numeric=False)
    numeric = _gnu_listing(path, numeric=True)
    assert len(files) == len(names) == len(numeric)
    for f, row, nrow in zip(files, names, numeric, strict=True):
        where = f"entry {f.name!r}"
        assert row["name"] == f.name, where
        assert row["perm"] == _TYPE_CHARS[f.type] + stat.filemode(f.mode)[1:], where
        assert row["owner"] == f"{f.uname or f.uid}/{f.gname or f.gid}", where
        assert nrow["owner"] == f"{f.uid}/{f.gid}", where
        if f.type in ("char", "block"):
            assert row["size"] == f"{f.devmajor},{f.devminor}", where
        else:
            assert row["size"] == str(f.uncompressed_size), where
        # GNU tar prints the fraction with trailing zeros dropped, as Go's RFC 3339 form does.
        assert row["time"] == f.mod_time.replace("T", " ").removesuffix("Z"), where
        assert row["link"] == f.linkname, where


def _compare_with_tarfile(
    path: Path, files: list[FileMetadata], global_keys: frozenset[str] = frozenset()
) -> None:
    with tarfile.open(path) as tf:
        members = tf.getmembers()
        end_of_members = tf.offset
    assert len(members) == len(files)
    for f, ti in zip(files, members, strict=True):
        where = f"entry {f.name!r}"
        # tarfile drops a directory's trailing slash; the TOC keeps the name as stored.
        assert ti.name == (f.name.rstrip("/") if f.type == "dir" else f.name), where
        assert ti.offset_data == f.uncompressed_offset, where
        assert ti.size == f.uncompressed_size, where
        assert ti.linkname == f.linkname, where
        assert (ti.mode, ti.uid, ti.gid) == (f.mode, f.uid, f.gid), where
        assert (ti.uname, ti.gname) == (f.uname, f.gname), where
        if f.type in ("char", "block"):
            assert (ti.devmajor, ti.devminor) == (f.devmajor, f.devminor), where
        expected_pax = {k: v.encode("utf-8", "surrogateescape") for k, v in ti.pax_headers.items()
                        if k not in global_keys}
        assert f.pax == expected_pax, where
        assert list(f.pax) == sorted(f.pax), where
        expected_xattrs = {k[len("SCHILY.xattr."):]: v for k, v in expected_pax.items()
                           if k.startswith("SCHILY.xattr.")}
        assert f.xattrs() == expected_xattrs, where
    last = files[-1]
    assert last.uncompressed_offset + ((last.uncompressed_size + 511) // 512) * 512 <= end_of_members


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def layer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tar_toc")


@pytest.fixture(scope="module")
def edge_tar(layer_dir: Path) -> Path:
    return edge_case_layer(layer_dir / "edge.tar")


@pytest.fixture(scope="module")
def edge_bytes(edge_tar: Path) -> bytes:
    return edge_tar.read_bytes()


@pytest.fixture(scope="module")
def edge_toc(edge_bytes: bytes) -> TocResult:
    return _parse(edge_bytes)


@pytest.fixture(scope="module")
def real_tar(layer_dir: Path) -> Path:
    return real_files_layer(layer_dir / "real.tar")


@pytest.fixture(scope="module")
def real_toc(real_tar: Path) -> TocResult:
    return _parse(real_tar.read_bytes(), chunk=1 << 20)


# ---------------------------------------------------------------------------------------- real layers


def test_real_layer_matches_gnu_tar(real_tar: Path, real_toc: TocResult) -> None:
    assert len(real_toc.files) > 100
    _compare_with_gnu_tar(real_tar, real_toc.files)


def test_real_layer_matches_tarfile(real_tar: Path, real_toc: TocResult) -> None:
    _compare_with_tarfile(real_tar, real_toc.files)


def test_real_layer_archive_size(real_tar: Path, real_toc: TocResult) -> None:
    end = _gnu_end_of_archive(real_tar)
    assert real_toc.uncompressed_archive_size == end
    data = real_tar.read_bytes()
    assert data[end - 1024 : end] == bytes(1024)
    assert len(data) >= end and not any(data[end:])


@pytest.mark.parametrize("chunking", ["511", "513", "4096", "random"])
def test_real_layer_any_chunking(real_tar: Path, real_toc: TocResult, chunking: str) -> None:
    sizes = _random_sizes(7) if chunking == "random" else _fixed(int(chunking))
    parser = TarTocParser()
    for piece in _chunks(real_tar.read_bytes(), sizes):
        parser.feed(piece)
    assert parser.finish() == real_toc


def test_real_layer_pax_format(layer_dir: Path) -> None:
    src = Path(tarfile.__file__).parent / "json"
    path = real_files_layer(layer_dir / "real-pax.tar", src_dirs=[src], tar_format="pax")
    toc = _parse(path.read_bytes(), chunk=777)
    _compare_with_gnu_tar(path, toc.files)
    _compare_with_tarfile(path, toc.files)
    assert toc.uncompressed_archive_size == _gnu_end_of_archive(path)


# ----------------------------------------------------------------------------------- edge-case layer


def test_edge_layer_matches_gnu_tar(edge_tar: Path, edge_toc: TocResult) -> None:
    _compare_with_gnu_tar(edge_tar, edge_toc.files)


def test_edge_layer_matches_tarfile(edge_tar: Path, edge_toc: TocResult) -> None:
    _compare_with_tarfile(edge_tar, edge_toc.files)


def test_edge_layer_archive_size(edge_tar: Path, edge_toc: TocResult) -> None:
    assert edge_toc.uncompressed_archive_size == _gnu_end_of_archive(edge_tar)


def test_edge_layer_features(edge_toc: TocResult, edge_bytes: bytes) -> None:
    by_name: dict[str, list[FileMetadata]] = {}
    for f in edge_toc.files:
        by_name.setdefault(f.name, []).append(f)
    assert {f.type for f in edge_toc.files} == set(_TYPE_CHARS)

    big = by_name[BIG_FILE_NAME][0]
    assert big.uncompressed_size == BIG_FILE_SIZE
    header = big.uncompressed_offset - 512
    assert edge_bytes[header : header + 100].startswith(b"data/big.bin")

    first, second = by_name[DUPLICATE_NAME]
    assert first.uncompressed_offset < second.uncompressed_offset
    end = second.uncompressed_offset + second.uncompressed_size
    assert edge_bytes[second.uncompressed_offset : end] == b"second version wins\n"

    # PAX path (component > 100 chars), ustar prefix split, GNU 'L' and 'K' records.
    assert any(len(n) > 100 and n.startswith("long/f") for n in by_name)
    assert any(len(n) > 100 and n.startswith("long/d") for n in by_name)
    gnu_long = [n for n in by_name if n.startswith("gnu/g") and n.endswith("long-name-file.txt")]
    assert gnu_long and not by_name[gnu_long[0]][0].pax
    assert len(by_name["gnu/link-to-long-target"][0].linkname) > 100
    assert len(by_name["data/link-long-target"][0].linkname) > 100

    # Directories keep their slash; implied parents stay absent.
    assert "bin/" in by_name and "py/old-style-dir/" in by_name
    assert by_name["py/old-style-dir/"][0].type == "dir" and by_name["py/old-style-file"][0].type == "reg"
    assert "implied/a/b/c.txt" in by_name and not any(n.startswith("implied/a/b/") and n.endswith("/")
                                                       for n in by_name)

    xattrs = by_name["py/xattrs"][0]
    assert xattrs.xattrs()["security.capability"] == CAPABILITY_XATTR
    assert xattrs.xattrs()["user.binary"] == bytes(range(256))
    assert xattrs.mod_time == "2022-04-15T05:20:00.5Z"
    assert by_name["py/nanos"][0].mod_time == "2023-11-14T22:13:20.000000001Z"
    assert by_name["data/hello.txt"][0].mod_time == "2023-11-14T22:13:20.123456789Z"
    assert by_name["gnu/old-file"][0].mod_time.startswith("1968-")

    ids = by_name["py/big-ids"][0]
    assert (ids.uid, ids.gid, ids.uname, ids.gname) == (5_000_000, 6_000_000, "jos\u00e9", "\u00e9quipe")
    assert by_name["gnu/old-file"][0].uid == 3_000_000  # base-256 field
    assert (by_name["py/block-dev"][0].devmajor, by_name["py/block-dev"][0].devminor) == (259, 70000)

    assert by_name["bin/suid-tool"][0].mode == 0o4755
    assert by_name["bin/sgid-tool"][0].mode == 0o2755
    assert by_name["tmp/"][0].mode == 0o1777
    assert by_name["whiteout/.wh.gone"][0].type == "reg"
    assert by_name["whiteout/opaque/.wh..wh..opq"][0].uncompressed_size == 0
    assert by_name["unicode/日本語/ファイル.txt"][0].type == "reg"

    # A non-UTF-8 name keeps its raw bytes, as Go strings do.
    raw = [n for n in by_name if n.startswith("gnu/latin1-")]
    assert raw and raw[0].encode("utf-8", "surrogateescape") == b"gnu/latin1-caf\xe9.txt"


@pytest.mark.parametrize("chunking", ["1", "511", "513", "4096", "random"])
def test_edge_layer_any_chunking(edge_bytes: bytes, edge_toc: TocResult, chunking: str) -> None:
    sizes = _random_sizes(11) if chunking == "random" else _fixed(int(chunking))
    parser = TarTocParser()
    if chunking == "1":
        # One byte at a time through every header; the big file's data in one piece keeps this fast.
        big = next(f for f in edge_toc.files if f.name == BIG_FILE_NAME)
        start, stop = big.uncompressed_offset + 1, big.uncompressed_offset + big.uncompressed_size - 1
        for i in range(start):
            parser.feed(edge_bytes[i : i + 1])
        parser.feed(edge_bytes[start:stop])
        for i in range(stop, len(edge_bytes)):
            parser.feed(edge_bytes[i : i + 1])
    else:
        for piece in _chunks(edge_bytes, sizes):
            parser.feed(piece)
    assert parser.finish() == edge_toc


def test_feed_accepts_bytes_likes(edge_bytes: bytes, edge_toc: TocResult) -> None:
    parser = TarTocParser()
    parser.feed(bytearray(edge_bytes[:10000]))
    parser.feed(memoryview(edge_bytes)[10000:20000])
    parser.feed(memoryview(edge_bytes[20000:]).cast("c"))
    assert parser.position == len(edge_bytes) and parser.done
    assert parser.finish() == edge_toc


def test_global_header_is_consumed(layer_dir: Path, edge_toc: TocResult) -> None:
    path = edge_case_layer(layer_dir / "edge-global.tar", global_header=True)
    data = path.read_bytes()
    parser = TarTocParser()
    parser.feed(data)
    toc = parser.finish()
    assert parser.global_pax == {"comment": b"built for tests"}
    assert [f.name for f in toc.files] == [f.name for f in edge_toc.files]
    assert all("comment" not in f.pax for f in toc.files)
    _compare_with_tarfile(path, toc.files, global_keys=frozenset({"comment"}))
    assert toc.uncompressed_archive_size == _gnu_end_of_archive(path)


# --------------------------------------------------------------------------------- crafted archives


def _member(info: tarfile.TarInfo, data: bytes = b"", fmt: int = tarfile.PAX_FORMAT) -> bytes:
    info.size = info.size or len(data)
    out = info.tobuf(fmt, "utf-8", "surrogateescape") + data
    return out + bytes(-len(out) % 512)


def _tar(*members: bytes) -> bytes:
    return b"".join(members) + bytes(1024)


def _set_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block[:512])


def _retype(header: bytes, flag: bytes) -> bytes:
    block = bytearray(header[:512])
    block[156:157] = flag
    _set_checksum(block)
    return bytes(block) + header[512:]


def test_pax_size_and_header_only_types() -> None:
    sized = tarfile.TarInfo("sized")
    sized.pax_headers = {"size": "5"}  # the ustar size field stays 0
    head = sized.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    odd_dir = tarfile.TarInfo("dir-with-size/")
    odd_dir.type, odd_dir.size = tarfile.DIRTYPE, 1024
    data = _tar(head + b"12345" + bytes(507), odd_dir.tobuf(tarfile.USTAR_FORMAT),
                _member(tarfile.TarInfo("after"), b"x"))
    toc = _parse(data)
    assert [(f.name, f.uncompressed_size) for f in toc.files] == [("sized", 5), ("dir-with-size/", 1024),
                                                                  ("after", 1)]
    # Like Go (and tarfile), a directory's size field announces no data: the next header follows at once.
    assert toc.files[2].uncompressed_offset == len(head) + 512 + 512 + 512


def test_v7_header_has_no_owner_names() -> None:
    info = tarfile.TarInfo("v7file")
    info.uname = "someone"
    block = bytearray(_member(info, b"abc", tarfile.USTAR_FORMAT))
    block[257:265] = bytes(8)
    _set_checksum(block)
    toc = _parse(_tar(bytes(block)))
    assert (toc.files[0].name, toc.files[0].uname, toc.files[0].uncompressed_size) == ("v7file", "", 3)


def test_signed_checksum_is_accepted() -> None:
    block = bytearray(_member(tarfile.TarInfo("caf\u00e9"), b"", tarfile.USTAR_FORMAT))
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b > 127 else b for b in block)
    block[148:156] = b"%06o\x00 " % signed
    assert _parse(_tar(bytes(block))).files[0].name == "caf\u00e9"


@pytest.mark.parametrize(
    ("flag", "what"),
    [(b"7", "contiguous"), (b"D", "dumpdir"), (b"V", "volume"), (b"M", "multi-volume"), (b"N", "old long"),
     (b"S", "sparse"), (b"Z", "unknown")],
)
def test_refused_types_name_the_entry(flag: bytes, what: str) -> None:
    odd = _retype(_member(tarfile.TarInfo("weird/entry"), b"", tarfile.USTAR_FORMAT), flag)
    data = _tar(_member(tarfile.TarInfo("ok"), b"fine"), odd)
    with pytest.raises(LayerError, match=rf"unsupported tar entry type '{flag.decode()}' \(.*{what}.*\) "
                                         r"for 'weird/entry' at offset 1024"):
        _parse(data)


def test_gnu_tar_sparse_files_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    for fmt, pattern in (("gnu", r"type 'S'"), ("pax", r"PAX sparse file")):
        out = tmp_path / f"sparse-{fmt}.tar"
        subprocess.run(["tar", f"--format={fmt}", "--sparse", "-cf", str(out), "-C", str(src), "holes"],
                       check=True, env=_ENV)
        with pytest.raises(LayerError, match=pattern) as err:
            _parse(out.read_bytes())
        assert "holes" in str(err.value)


def test_truncations(edge_bytes: bytes, edge_toc: TocResult) -> None:
    big = next(f for f in edge_toc.files if f.name == BIG_FILE_NAME)
    with pytest.raises(LayerError, match=r"inside the data of 'data/big.bin'"):
        _parse(edge_bytes[: big.uncompressed_offset + 1000])
    with pytest.raises(LayerError, match=r"inside a header block at offset 1024"):
        _parse(edge_bytes[:1124])
    # Cut right after the PAX header of the first entry, then inside its payload.
    with pytest.raises(LayerError, match=r"after an extended header without its member"):
        _parse(edge_bytes[:1024])
    with pytest.raises(LayerError, match=r"inside the extended header"):
        _parse(edge_bytes[:600], chunk=100)
    end = edge_toc.uncompressed_archive_size
    for cut in (end - 1024, end - 512):
        with pytest.raises(LayerError, match=r"no end-of-archive marker"):
            _parse(edge_bytes[:cut])
        loose = _parse(edge_bytes[:cut], allow_missing_end=True)
        assert loose.files == edge_toc.files and loose.uncompressed_archive_size == cut
    with pytest.raises(LayerError, match=r"no end-of-archive marker"):
        _parse(b"")
    with pytest.raises(LayerError, match="inside the data of"):
        _parse(edge_bytes[: big.uncompressed_offset + 10], allow_missing_end=True)


def test_garbage_and_bad_checksums(edge_bytes: bytes) -> None:
    garbage = random.Random(3).randbytes(4096)
    with pytest.raises(LayerError, match=r"bad tar header at offset 0: checksum mismatch"):
        _parse(garbage)
    with pytest.raises(LayerError, match=r"bad tar header at offset 0"):
        _parse(b"\x1f\x8b\x08" + bytes(2000))  # a gzip stream fed by mistake
    corrupt = bytearray(edge_bytes)
    header = 1024  # after the first entry's PAX header and payload
    corrupt[header + 2] ^= 0x20
    with pytest.raises(LayerError, match=r"offset 1024: checksum mismatch.*near b'biN/'"):
        _parse(bytes(corrupt))


def test_zero_block_then_data_is_refused() -> None:
    data = bytes(512) + _member(tarfile.TarInfo("late"), b"") + bytes(1024)
    with pytest.raises(LayerError, match=r"zero block is followed by a non-zero block"):
        _parse(data)


def test_bad_pax_records() -> None:
    head = tarfile.TarInfo("././@PaxHeader")
    for payload in (b"99 path=x\n", b"10 pathxy\n", b"10 =value\n", b"x path=y\n", b"9 path=x\r"):
        head.type, head.size = tarfile.XHDTYPE, len(payload)
        member = head.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)
        with pytest.raises(LayerError, match=r"PAX header '\./\./@PaxHeader'"):
            _parse(_tar(member, _member(tarfile.TarInfo("f"), b"")))
    head.type, head.size = tarfile.XHDTYPE, MAX_SPECIAL_SIZE + 1
    with pytest.raises(LayerError, match=r"limit"):
        _parse(head.tobuf(tarfile.USTAR_FORMAT))
    bad_mtime = tarfile.TarInfo("t")
    bad_mtime.pax_headers = {"mtime": "12x"}
    with pytest.raises(LayerError, match=r"bad PAX header for tar entry 't'.*mtime"):
        _parse(_tar(_member(bad_mtime)))


def test_pax_details() -> None:
    info = tarfile.TarInfo("short")
    info.pax_headers = {"path": "from/pax", "linkpath": "", "mtime": "-1.25", "uname": "x"}
    info.type, info.linkname = tarfile.SYMTYPE, "header-target"
    toc = _parse(_tar(_member(info)))
    f = toc.files[0]
    # An empty PAX value keeps the header's value, like Go; the record still shows in `pax`.
    assert (f.name, f.linkname, f.uname, f.mod_time) == ("from/pax", "header-target", "x",
                                                          "1969-12-31T23:59:58.75Z")
    assert f.pax["linkpath"] == b""


def test_parse_tar_toc_helper(edge_bytes: bytes, edge_toc: TocResult) -> None:
    stream = io.BytesIO(edge_bytes)
    assert parse_tar_toc(iter(lambda: stream.read(5000), b"")) == edge_toc
