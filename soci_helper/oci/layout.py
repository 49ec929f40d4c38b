"""OCI image layouts: directories (read and write) and OCI archives (tar of a layout, read in place)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .. import digest as _digest
from ..errors import DigestError, NotFound, ReferenceError_
from ..store.atomic import write_atomically
from . import mediatype as mt
from .manifest import ANNOTATION_REF_NAME, Descriptor, ImageIndex, ManifestError, canonical_json, parse_index

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
CHUNK = 1 << 20


def _blob_relpath(digest: str) -> str:
    return "blobs/sha256/" + _digest.hex_part(digest)


class _LayoutReader:
    """Reading shared by directories and archives; subclasses say where each file's bytes are."""

    display: str

    def _locate(self, relpath: str) -> tuple[str, int, int] | None:
        """(file to open, offset of the content in it, size) or None when absent."""
        raise NotImplementedError

    def _read_file(self, relpath: str, what: str) -> bytes:
        loc = self._locate(relpath)
        if loc is None:
            raise NotFound(f"{self.display}: {what} not found")
        path, off, size = loc
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(size)
        if len(data) != size:
            raise ReferenceError_(f"{self.display}: {what} is truncated")
        return data

    def index_bytes(self) -> bytes:
        return self._read_file(INDEX_FILE, INDEX_FILE)

    def read_index(self) -> ImageIndex:
        try:
            return parse_index(self.index_bytes())
        except ManifestError as e:
            raise ManifestError(f"{self.display}: {INDEX_FILE}: {e}") from None

    def resolve(self, tag: str | None = None) -> Descriptor:
        """The descriptor in index.json tagged `tag` (ref.name annotation), or the only one when no tag."""
        entries = self.read_index().manifests
        if tag:
            for d in entries:
                if d.annotations.get(ANNOTATION_REF_NAME) == tag:
                    return d
            if tag.startswith("sha256:"):
                for d in entries:
                    if d.digest == tag:
                        return d
            tags = sorted({t for d in entries if (t := d.annotations.get(ANNOTATION_REF_NAME))})
            known = f" (tags: {', '.join(tags)})" if tags else " (no tagged images)"
            raise NotFound(f"{self.display}: no image tagged {tag!r}{known}")
        if not entries:
            raise NotFound(f"{self.display}: the layout holds no images")
        if len(entries) > 1:
            tags = sorted({t for d in entries if (t := d.annotations.get(ANNOTATION_REF_NAME))})
            raise ReferenceError_(
                f"{self.display}: the layout holds {len(entries)} images; name one with :TAG"
                + (f" (tags: {', '.join(tags)})" if tags else "")
            )
        return entries[0]

    def tags(self) -> list[str]:
        return [t for d in self.read_index().manifests if (t := d.annotations.get(ANNOTATION_REF_NAME))]

    def blob_size(self, digest: str) -> int | None:
        loc = self._locate(_blob_relpath(digest))
        return None if loc is None else loc[2]

    def has_blob(self, digest: str) -> bool:
        return self.blob_size(digest) is not None

    def _blob_loc(self, digest: str, size: int | None) -> tuple[str, int, int]:
        loc = self._locate(_blob_relpath(digest))
        if loc is None:
            raise NotFound(f"{self.display}: blob {digest} not found")
        if size is not None and loc[2] != size:
            raise DigestError(f"{self.display}: blob {digest} has {loc[2]} bytes, expected {size}")
        return loc

    def open_blob(self, digest: str, size: int | None = None) -> Iterator[bytes]:
        """Stream a blob; DigestError after the last chunk if it does not match `digest`.

        Missing blobs raise NotFound on the call, not on first iteration.
        """
        path, off, n = self._blob_loc(digest, size)
        return self._chunks(path, off, n, digest)

    def _chunks(self, path: str, off: int, n: int, digest: str) -> Iterator[bytes]:
        d = _digest.Digester()
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            raise NotFound(f"{self.display}: blob {digest} disappeared") from None
        with f:
            f.seek(off)
            left = n
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise DigestError(f"{self.display}: blob {digest} is truncated")
                left -= len(chunk)
                d.update(chunk)
                yield chunk
        if d.digest() != digest:
            raise DigestError(f"{self.display}: blob {digest}: digest mismatch: content is {d.digest()}")

    def read_blob(self, digest: str, size: int | None = None) -> bytes:
        return b"".join(self.open_blob(digest, size))

    def read_range(self, digest: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a blob, clipped at its end (not digest-checked)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        path, off, n = self._blob_loc(digest, None)
        if offset > n:
            raise ReferenceError_(f"{self.display}: blob {digest}: offset {offset} beyond its {n} bytes")
        length = min(length, n - offset)
        with open(path, "rb") as f:
            f.seek(off + offset)
            return f.read(length)


class OCILayout(_LayoutReader):
    """An OCI image layout directory."""

    def __init__(self, root: str | Path, create: bool = False) -> None:
        self.root = Path(root)
        self.display = f"oci:{self.root}"
        layout = self.root / LAYOUT_FILE
        if not layout.is_file():
            if not create:
                if not self.root.exists():
                    raise NotFound(f"{self.display}: no such directory")
                raise ReferenceError_(f"{self.display}: not an OCI layout (no {LAYOUT_FILE} file)")
            self._init()
        else:
            self._check_layout_file()

    def _check_layout_file(self) -> None:
        try:
            obj = json.loads((self.root / LAYOUT_FILE).read_bytes())
        except (OSError, ValueError):
            raise ReferenceError_(f"{self.display}: unreadable {LAYOUT_FILE} file") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("imageLayoutVersion"), str):
            raise ReferenceError_(f"{self.display}: invalid {LAYOUT_FILE} file")

    def _init(self) -> None:
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (self.root / INDEX_FILE).exists():
            self._atomic_write(INDEX_FILE, ImageIndex(manifests=[]).to_bytes())
        self._atomic_write(LAYOUT_FILE, canonical_json({"imageLayoutVersion": LAYOUT_VERSION}))

    def _locate(self, relpath: str) -> tuple[str, int, int] | None:
        p = self.root / relpath
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        return str(p), 0, st.st_size

    def blob_path(self, digest: str) -> Path:
        return self.root / _blob_relpath(digest)

    def _atomic_write(self, relpath: str, data: bytes) -> None:
        write_atomically(self.root / relpath, data, mode=0o600, fsync=True)

    def write_blob(self, data: bytes | str | Path | Iterable[bytes], digest: str | None = None) -> Descriptor:
        """Add a blob atomically (temp file + rename); verify it against `digest` when given.

        Returns a descriptor with an empty media type: the caller knows what the blob is.
        """
        blobs = self.root / "blobs" / "sha256"
        blobs.mkdir(parents=True, exist_ok=True)
        if digest is not None and self.has_blob(digest):
            return Descriptor(media_type="", digest=digest, size=self.blob_size(digest) or 0)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=blobs)
        d = _digest.Digester()
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in _iter_data(data):
                    d.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            got = d.digest()
            if digest is not None and got != digest:
                raise DigestError(f"{self.display}: blob {digest}: content digest is {got}")
            os.replace(tmp, blobs / _digest.hex_part(got))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return Descriptor(media_type="", digest=got, size=d.size)

    @contextlib.contextmanager
    def _index_lock(self) -> Iterator[None]:
        # Lock the oci-layout file, which every layout has, rather than add a
        # lock file other tools would not expect.
        with open(self.root / LAYOUT_FILE, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def add_manifest(self, desc: Descriptor, tag: str | None = None) -> Descriptor:
        """Record a stored manifest in index.json, replacing any entry with the same tag.

        Untagged manifests are listed too, so that tools which treat index.json
        as the set of roots keep them (where OCI 1.1 puts referrers).
        """
        if not self.has_blob(desc.digest):
            raise NotFound(f"{self.display}: manifest blob {desc.digest} is not in the layout")
        annotations = dict(desc.annotations)
        if tag:
            annotations[ANNOTATION_REF_NAME] = tag
        else:
            annotations.pop(ANNOTATION_REF_NAME, None)
        entry = Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                           annotations=annotations, platform=desc.platform,
                           artifact_type=desc.artifact_type)
        with self._index_lock():
            index = self.read_index()
            kept: list[Descriptor] = []
            for d in index.manifests:
                if tag and d.annotations.get(ANNOTATION_REF_NAME) == tag:
                    continue
                if d.digest == entry.digest and ANNOTATION_REF_NAME not in d.annotations and not tag:
                    continue
                kept.append(d)
            kept.append(entry)
            index.manifests = kept
            if index.media_type is None:
                index.media_type = mt.OCI_INDEX
            self._atomic_write(INDEX_FILE, index.to_bytes())
        return entry


def _iter_data(data: bytes | str | Path | Iterable[bytes]) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
    elif isinstance(data, (str, Path)):
        with open(data, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
    else:
        yield from data


class OCIArchive(_LayoutReader):
    """A tar of an OCI layout, read in place: member offsets come from one scan of the tar headers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.display = f"oci-archive:{self.path}"
        self._members: dict[str, tuple[int, int]] = {}
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
                if magic[:2] == b"\x1f\x8b" or magic == b"\x28\xb5\x2f\xfd":
                    raise ReferenceError_(
                        f"{self.display}: compressed archives are not supported; use a plain tar"
                    )
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    links: dict[str, str] = {}
                    for m in tar:
                        name = _norm_member(m.name)
                        if m.isreg():
                            if m.sparse:
                                raise ReferenceError_(
                                    f"{self.display}: sparse member {m.name} is not supported"
                                )
                            self._members[name] = (m.offset_data, m.size)
                        elif m.islnk():
                            links[name] = _norm_member(m.linkname)
                    for name, target in links.items():
                        if target in self._members:
                            self._members[name] = self._members[target]
        except FileNotFoundError:
            raise NotFound(f"{self.display}: no such file") from None
        except tarfile.TarError as e:
            raise ReferenceError_(f"{self.display}: not a readable tar archive ({e})") from None
        except IsADirectoryError:
            raise ReferenceError_(f"{self.display}: is a directory (use oci:DIR for a layout)") from None
        if LAYOUT_FILE not in self._members or INDEX_FILE not in self._members:
            raise ReferenceError_(f"{self.display}: not an OCI archive (no {LAYOUT_FILE} or {INDEX_FILE})")

    def _locate(self, relpath: str) -> tuple[str, int, int] | None:
        m = self._members.get(relpath)
        if m is None:
            return None
        return str(self.path), m[0], m[1]


def _norm_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")
