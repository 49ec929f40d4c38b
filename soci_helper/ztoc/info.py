"""The `ztoc info` summary: a JSON-ready description of a zTOC and the spans each file touches."""

from __future__ import annotations

from typing import Any

from .model import Ztoc
from .reader import parse_zinfo


def _printable(name: str) -> str:
    # Non-UTF-8 names are held with surrogate escapes; JSON gets U+FFFD for them, as Go's encoder does.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def describe(ztoc: Ztoc, blob_size: int) -> dict[str, Any]:
    zinfo = parse_zinfo(ztoc)
    files = []
    for f in ztoc.files:
        start = zinfo.span_of(f.uncompressed_offset)
        end = zinfo.span_of(f.uncompressed_offset + f.uncompressed_size - 1) if f.uncompressed_size else start
        files.append(
            {
                "filename": _printable(f.name),
                "offset": f.uncompressed_offset,
                "size": f.uncompressed_size,
                "type": f.type,
                "start_span": start,
                "end_span": end,
            }
        )
    return {
        "version": ztoc.version,
        "build_tool": _printable(ztoc.build_tool_identifier),
        "size": blob_size,
        "span_size": zinfo.span_size,
        "num_spans": ztoc.max_span_id + 1,
        "num_files": len(ztoc.files),
        "files": files,
    }
