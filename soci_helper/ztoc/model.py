"""In-memory zTOC: the table of contents and compression info of one layer, as upstream SOCI defines it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

ZTOC_VERSION = "0.9"
DEFAULT_SPAN_SIZE = 4 << 20
DEFAULT_MIN_LAYER_SIZE = 10 << 20
WINDOW_SIZE = 32768

# Entry types as upstream writes them into FileMetadata.type.
REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "reg", "dir", "symlink", "hardlink", "char", "block", "fifo"
ENTRY_TYPES = frozenset({REG, DIR, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO})


class CompressionAlgorithm(enum.IntEnum):
    GZIP = 1
    UNCOMPRESSED = 2


@dataclass(slots=True)
class FileMetadata:
    """One tar member. `uncompressed_offset` is where its data starts in the uncompressed tar."""

    name: str
    type: str
    uncompressed_offset: int
    uncompressed_size: int
    linkname: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    uname: str = ""
    gname: str = ""
    mod_time: str = ""
    devmajor: int = 0
    devminor: int = 0
    # Every PAX record of the entry (key -> raw value), e.g. "SCHILY.xattr.user.x".
    pax: dict[str, bytes] = field(default_factory=dict)

    def xattrs(self) -> dict[str, bytes]:
        """The runtime xattrs: PAX `SCHILY.xattr.` records with the prefix stripped."""
        p = "SCHILY.xattr."
        return {k[len(p):]: v for k, v in self.pax.items() if k.startswith(p)}


@dataclass(slots=True)
class Ztoc:
    """A decoded zTOC. `checkpoints` stays the raw blob; ztoc.zinfo parses it."""

    build_tool_identifier: str
    compressed_archive_size: int
    uncompressed_archive_size: int
    files: list[FileMetadata]
    compression_algorithm: CompressionAlgorithm
    max_span_id: int
    span_digests: list[str]
    checkpoints: bytes
    version: str = ZTOC_VERSION
    # Where `checkpoints` starts in the encoded zTOC it was decoded from (-1 if not decoded): a reader may
    # then read checkpoint windows from the zTOC's file instead of keeping them. Not part of the zTOC's value.
    checkpoints_offset: int = field(default=-1, compare=False, repr=False)


def format_mod_time(seconds: int, nanos: int = 0) -> str:
    """RFC 3339 in UTC as Go's time.RFC3339Nano prints it (trailing zeros of the fraction dropped)."""
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        base += "." + f"{nanos:09d}".rstrip("0")
    return base + "Z"


def parse_mod_time(text: str) -> tuple[int, int]:
    """Inverse of format_mod_time: (seconds, nanoseconds). Accepts numeric offsets too. ValueError if bad."""
    t = text.strip()
    frac = 0
    main, sep, rest = t.partition(".")
    if sep:
        digits = ""
        i = 0
        while i < len(rest) and rest[i].isdigit():
            i += 1
        digits, tz = rest[:i], rest[i:]
        if not digits or len(digits) > 9:
            raise ValueError(f"bad fraction in time {text!r}")
        frac = int(digits.ljust(9, "0"))
    else:
        main, tz = t[:19], t[19:]
    if tz in ("Z", "z"):
        tz = "+00:00"
    dt = datetime.fromisoformat(main + tz)
    if dt.tzinfo is None:
        raise ValueError(f"time without zone {text!r}")
    return int(dt.timestamp()), frac
