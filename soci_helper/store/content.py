"""Content-addressed blob store (OCI layout under ROOT/content) with per-digest inter-process locks."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .. import digest as dg
from ..errors import DigestError, NotFound, StoreError
from .atomic import write_atomically

if TYPE_CHECKING:
    from filelock import FileLock

log = logging.getLogger(__name__)

# Blobs we index can be big; stream them through in slices of this size.
_CHUNK = 1 << 20


def _disk_error(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing {what}")
    return StoreError(f"cannot write {what}: {exc.strerror or exc}")


class ContentStore:
    """Blobs at ROOT/content/blobs/sha256/<hex>, as upstream lays them out.

    Writers stream into a temporary file beside the blobs, check the digest, then take the
    digest's lock and rename into place, so readers in any process see whole blobs or none.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.dir = self.root / "content"
        self.blobs = self.dir / "blobs" / "sha256"
        self.ingest_dir = self.dir / "ingest"
        self.locks_dir = self.root / "locks"
        try:
            for d in (self.blobs, self.ingest_dir, self.locks_dir):
                d.mkdir(parents=True, exist_ok=True)
            layout = self.dir / "oci-layout"
            if not layout.exists():
                self._atomic_small_write(layout, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        except OSError as exc:
            raise _disk_error(exc, f"store at {self.root}") from exc

    # -- paths and locks -------------------------------------------------

    def path(self, digest: str) -> Path:
        return self.blobs / dg.hex_part(digest)

    def lock(self, name: str, timeout: float = 600.0) -> FileLock:
        """A named inter-process lock; digests name the blob they guard."""
        # Imported here: opening the store to look something up (the mount helper's path) takes no locks.
        from filelock import FileLock

        safe = name.replace(":", "-").replace("/", "_")
        return FileLock(str(self.locks_dir / f"{safe}.lock"), timeout=timeout)

    # -- reads -------------------------------------------------------------

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the local store") from None

    def read(self, digest: str, verify: bool = True) -> bytes:
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the local store") from None
        if verify:
            try:
                dg.verify(data, digest, f"local blob {digest}")
            except DigestError:
                raise StoreError(f"local blob {digest} is damaged (digest mismatch); remove it and rebuild") from None
        return data

    def open(self, digest: str):
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the local store") from None

    def digests(self) -> Iterator[str]:
        for p in sorted(self.blobs.iterdir()):
            if len(p.name) == 64 and p.is_file():
                yield "sha256:" + p.name

    # -- writes ------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview, expected: str | None = None) -> str:
        """Store `data`; returns its digest. If `expected` is given it must match."""
        return self.ingest([data], expected)

    def ingest(self, chunks: Iterable[bytes | bytearray | memoryview], expected: str | None = None, *,
               verified: bool = False) -> str:
        """Stream chunks into the store, verifying the digest before the blob becomes visible.

        verified: `chunks` checks `expected` itself and raises before its end when the bytes do not match
        it (a registry client's blob stream does): they are not hashed a second time here."""
        if verified and expected is None:
            raise ValueError("ingest(verified=True) needs the expected digest")
        if expected is not None:
            dg.validate(expected)
            if self.has(expected):
                # Drain nothing: the caller's iterator may be a network stream it will close.
                return expected
        fd, tmp = tempfile.mkstemp(dir=self.ingest_dir, prefix="blob-")
        try:
            h = None if verified else dg.Digester()
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in chunks:
                        if h is not None:
                            h.update(chunk)
                        f.write(chunk)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise _disk_error(exc, f"blob {expected or '(new)'}") from exc
            got = h.digest() if h is not None else expected
            assert got is not None
            if expected is not None and got != expected:
                raise DigestError(f"blob digest mismatch: expected {expected}, got {got}")
            with self.lock(got):
                if not self.has(got):
                    os.rename(tmp, self.path(got))
                    tmp = ""
            return got
        finally:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def delete(self, digest: str) -> bool:
        with self.lock(digest):
            try:
                self.path(digest).unlink()
                return True
            except FileNotFoundError:
                return False

    def _atomic_small_write(self, path: Path, data: bytes) -> None:
        write_atomically(path, data, mode=0o600)
