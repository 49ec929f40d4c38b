"""Content digests: parsing, validating and computing `sha256:<hex>` strings."""

from __future__ import annotations

import hashlib
import os
import re

from .errors import DigestError

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def validate(digest: str) -> str:
    """Return `digest` if it is a well-formed sha256 digest, else raise DigestError."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise DigestError(f"invalid digest {digest!r}: want sha256:<64 lowercase hex>")
    return digest


def hex_part(digest: str) -> str:
    return validate(digest)[len("sha256:"):]


def of_bytes(data: bytes | bytearray | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def of_file(path: str | os.PathLike[str]) -> str:
    """The digest of a whole file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class Digester:
    """Incremental sha256 that also counts bytes, for verifying streams."""

    __slots__ = ("_h", "size")

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def digest(self) -> str:
        return "sha256:" + self._h.hexdigest()


def verify(data: bytes | bytearray | memoryview, expected: str, what: str = "content") -> None:
    """Raise DigestError unless sha256(data) equals `expected`."""
    got = of_bytes(data)
    if got != validate(expected):
        raise DigestError(f"{what}: digest mismatch: expected {expected}, got {got}")
