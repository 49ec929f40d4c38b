"""Builds a zTOC from a layer stream in one pass: checkpoints, span digests and tar TOC together."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import LayerError
from .gzip_index import GzipIndexer, TarIndexer
from .model import REG, CompressionAlgorithm, Ztoc
from .tar_toc import TarTocParser

GZIP = "gzip"
UNCOMPRESSED = "uncompressed"


def build_ztoc(
    chunks: Iterable[bytes | bytearray | memoryview],
    compression: str,
    span_size: int,
    build_tool: str,
    progress: Callable[[int], None] | None = None,
    head_span: int = 0,
) -> Ztoc:
    """Index one layer. `chunks` is the layer blob as stored (compressed); never held whole.

    `progress` is called with the number of compressed bytes consumed after each chunk. With
    `head_span` (gzip layers), each regular file of at least span_size bytes also gets a span of its
    own that starts where its data starts and ends about head_span bytes into it, so a reader of a
    big file's head (a model's header, an ELF header) fetches that much instead of a whole span.
    """
    if span_size <= 0:
        raise LayerError(f"span size must be positive, got {span_size}")
    if head_span < 0:
        raise LayerError(f"head span must not be negative, got {head_span}")
    if compression == GZIP:
        indexer: GzipIndexer | TarIndexer = GzipIndexer(span_size, head_span=head_span)
        algorithm = CompressionAlgorithm.GZIP
    elif compression == UNCOMPRESSED:
        indexer = TarIndexer(span_size)
        algorithm = CompressionAlgorithm.UNCOMPRESSED
    else:
        raise LayerError(f"cannot index {compression} layers")
    toc = TarTocParser()
    marking = isinstance(indexer, GzipIndexer) and head_span > 0
    seen = 0
    for chunk in chunks:
        # feed_iter bounds what a highly compressible chunk can inflate to at once.
        for out in indexer.feed_iter(chunk):
            toc.feed(out)
            if marking:
                files = toc.files
                for f in files[seen:]:
                    if f.type == REG and f.uncompressed_size >= span_size:
                        indexer.mark_file(f.uncompressed_offset)
                seen = len(files)
        if progress is not None:
            progress(len(chunk))
    result = indexer.finish()
    parsed = toc.finish()
    return Ztoc(
        build_tool_identifier=build_tool,
        compressed_archive_size=result.compressed_size,
        uncompressed_archive_size=parsed.uncompressed_archive_size,
        files=parsed.files,
        compression_algorithm=algorithm,
        max_span_id=result.num_spans - 1,
        span_digests=result.span_digests,
        checkpoints=result.checkpoints,
    )
