"""Random access to a layer's uncompressed bytes through its zTOC: fetch spans, verify, inflate."""

from __future__ import annotations

from collections.abc import Callable

from .. import digest as dg
from ..errors import DigestError, NotFound, ZtocError
from . import zinfo as zi
from .extract import extract_span
from .model import HARDLINK, REG, CompressionAlgorithm, FileMetadata, Ztoc

# fetch(offset, length) -> exactly `length` bytes of the compressed layer blob starting at `offset`.
Fetch = Callable[[int, int], bytes]


def parse_zinfo(ztoc: Ztoc) -> zi.GzipZinfo | zi.TarZinfo:
    if ztoc.compression_algorithm == CompressionAlgorithm.GZIP:
        # Bytes past the tar's end are never served, so the archive size bounds the last span.
        return zi.GzipZinfo(ztoc.checkpoints, ztoc.compressed_archive_size, ztoc.uncompressed_archive_size)
    return zi.TarZinfo.from_bytes(ztoc.checkpoints, ztoc.compressed_archive_size)


def normalize_name(name: str) -> str:
    """Tar names come as `./a/b`, `a/b/` or `/a/b`; the TOC is searched by `a/b`."""
    n = name.strip("/")
    while n.startswith("./"):
        n = n[2:].lstrip("/")
    return "" if n == "." else n


class LayerReader:
    """Serves byte ranges of the uncompressed layer; every span is checked against its digest first."""

    def __init__(self, ztoc: Ztoc, fetch: Fetch, layer: str = "layer") -> None:
        self.ztoc = ztoc
        self.zinfo = parse_zinfo(ztoc)
        if self.zinfo.num_spans != len(ztoc.span_digests):
            raise ZtocError(
                f"zTOC has {len(ztoc.span_digests)} span digests but its checkpoints describe "
                f"{self.zinfo.num_spans} spans"
            )
        self.fetch = fetch
        self.layer = layer
        self.spans_fetched = 0
        self.bytes_fetched = 0

    def span(self, i: int) -> bytes:
        start, end = self.zinfo.compressed_range(i)
        assert end is not None  # parse_zinfo always gives the compressed size
        data = self.fetch(start, end - start)
        self.spans_fetched += 1
        self.bytes_fetched += len(data)
        if len(data) != end - start:
            raise DigestError(f"{self.layer}: span {i}: got {len(data)} bytes, expected {end - start}")
        got = dg.of_bytes(data)
        if got != self.ztoc.span_digests[i]:
            want = self.ztoc.span_digests[i]
            raise DigestError(f"{self.layer}: span {i} digest mismatch: expected {want}, got {got}")
        return extract_span(self.zinfo, i, data)

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        out = bytearray()
        first = self.zinfo.span_of(offset)
        last = self.zinfo.span_of(offset + length - 1)
        for i in range(first, last + 1):
            s_start, _ = self.zinfo.uncompressed_range(i)
            data = self.span(i)
            lo = max(offset, s_start) - s_start
            hi = min(offset + length, s_start + len(data)) - s_start
            out += data[lo:hi]
        if len(out) != length:
            raise ZtocError(f"{self.layer}: range {offset}+{length} runs past the layer's data")
        return bytes(out)

    def find(self, path: str) -> FileMetadata:
        want = normalize_name(path)
        found: FileMetadata | None = None
        for f in self.ztoc.files:  # the later entry wins, as in tar
            if normalize_name(f.name) == want:
                found = f
        if found is None:
            raise NotFound(f"{path}: no such file in the layer")
        return found

    def read_file(self, path: str) -> bytes:
        entry = self.find(path)
        seen = 0
        while entry.type == HARDLINK:
            seen += 1
            if seen > 64:
                raise ZtocError(f"{path}: hardlink chain too long")
            entry = self.find(entry.linkname)
        if entry.type != REG:
            raise NotFound(f"{path}: not a regular file (type {entry.type})")
        return self.read(entry.uncompressed_offset, entry.uncompressed_size)
