"""Operations on the local index store: list, info, remove, rebuild the database, extract a file."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import NotFound, SociError
from ..oci.manifest import Descriptor
from ..store.artifacts import TYPE_INDEX, TYPE_ZTOC, ArtifactEntry, ArtifactsDB
from ..store.content import ContentStore
from ..ztoc import codec, prefetch
from ..ztoc.model import Ztoc
from ..ztoc.prefetch import PrefetchSpan
from . import soci_index as si

if TYPE_CHECKING:
    # The registry client (requests) is only needed to read a remote layer, the zTOC reader only to build
    # one; the mount helper opens the store on every mount and should not pay for importing them.
    from ..oci.source import SourceOptions
    from ..ztoc.reader import Fetch

log = logging.getLogger(__name__)

# Blobs larger than this are layers or zTOCs, never manifests: rebuild-db does not parse them.
_MAX_MANIFEST = 4 << 20


@dataclass(slots=True)
class Store:
    """The store root as one object: blobs plus the artifacts database."""

    content: ContentStore
    db: ArtifactsDB

    @classmethod
    def open(cls, root: str) -> Store:
        content = ContentStore(root)
        return cls(content, ArtifactsDB(content.root / "artifacts.db"))

    def close(self) -> None:
        self.db.close()

    def load_ztoc(self, digest: str) -> Ztoc:
        return codec.decode(self.content.read(digest))

    def load_index(self, digest: str) -> si.SociIndex:
        return si.parse(self.content.read(digest), f"SOCI index {digest}")

    def prefetches(self) -> list[tuple[si.PrefetchRef, str]]:
        """Prefetch artifacts held here, each with an index that lists it (the database does not track
        them: they are found through the indexes, as push and index rm find them)."""
        out: dict[str, tuple[si.PrefetchRef, str]] = {}
        for e in self.db.indexes():
            if not self.content.has(e.digest):
                continue
            try:
                index = self.load_index(e.digest)
            except SociError as exc:
                log.warning("%s", exc)
                continue
            for p in index.prefetches:
                if p.digest not in out and self.content.has(p.digest):
                    out[p.digest] = (p, e.digest)
        return list(out.values())

    def load_prefetch(self, digest: str) -> list[PrefetchSpan]:
        return prefetch.decode(self.content.read(digest))

    def resolve_digest(self, prefix: str, type_: str) -> str:
        """Accept a full digest, or an unambiguous prefix of its hex part as upstream users type it."""
        if prefix.startswith("sha256:") and len(prefix) == 71:
            return prefix
        hexp = prefix.removeprefix("sha256:")
        rows = [e.digest for e in self.db.all() if e.type == type_ and e.digest[7:].startswith(hexp)]
        if len(rows) == 1 and hexp:
            return rows[0]
        what = "index" if type_ == TYPE_INDEX else "ztoc"
        if not rows or not hexp:
            raise NotFound(f"no {what} {prefix} in the local store")
        raise SociError(f"{prefix} names {len(rows)} {what}es; give more of the digest")

    def remove_index(self, digest: str) -> list[str]:
        """Remove an index and the zTOCs and prefetch artifacts no other index uses; returns the removed digests."""
        entry = self.db.get(digest)
        if entry is None or entry.type != TYPE_INDEX:
            raise NotFound(f"no index {digest} in the local store")
        removed = [digest]
        try:
            mine = {d for _, _, d, _ in self.load_index(digest).blobs()}
        except SociError:
            mine = set()
        self.db.remove(digest)
        self.content.delete(digest)
        still_used: set[str] = set()
        for other in self.db.indexes():
            try:
                still_used |= {d for _, _, d, _ in self.load_index(other.digest).blobs()}
            except SociError:
                continue
        for z in sorted(mine - still_used):
            self.db.remove(z)
            self.content.delete(z)
            removed.append(z)
        return removed

    def rebuild_db(self) -> tuple[int, int]:
        """Rebuild the artifacts database from the blobs; returns (indexes, ztocs) recorded."""
        indexes: dict[str, tuple[si.SociIndex, int]] = {}
        manifests: dict[str, dict] = {}
        for d in self.content.digests():
            path = self.content.path(d)
            size = path.stat().st_size
            if size > _MAX_MANIFEST:
                continue
            raw = path.read_bytes()
            if not raw.lstrip().startswith(b"{"):
                continue
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            try:
                indexes[d] = (si.parse(raw, d), size)
                continue
            except SociError:
                pass
            if isinstance(doc.get("layers"), list) and isinstance(doc.get("config"), dict):
                manifests[d] = doc
        by_v2_annotation = {
            (m.get("annotations") or {}).get(si.ANNOTATION_INDEX_DIGEST): d for d, m in manifests.items()
        }
        old = {e.digest: e for e in self.db.all()}
        self.db.clear()
        n_ztocs = 0
        for d, (index, size) in sorted(indexes.items()):
            image = (index.subject or {}).get("digest") or by_v2_annotation.get(d, "")
            prev = old.get(d)
            self.db.put(
                ArtifactEntry(
                    digest=d,
                    type=TYPE_INDEX,
                    size=size,
                    original_digest=image,
                    image_digest=image,
                    image_ref=prev.image_ref if prev else "",
                    platform=self._platform_of(manifests.get(image)) or (prev.platform if prev else ""),
                    media_type=si.MEDIA_TYPE_OCI_MANIFEST,
                    artifact_type=index.artifact_type,
                    created_at=prev.created_at if prev else "",
                )
            )
            for z in index.ztocs:
                if not self.content.has(z.digest):
                    log.warning("index %s lists zTOC %s, which is not in the store", d, z.digest)
                    continue
                prevz = old.get(z.digest)
                self.db.put(
                    ArtifactEntry(
                        digest=z.digest,
                        type=TYPE_ZTOC,
                        size=self.content.size(z.digest),
                        original_digest=z.layer_digest,
                        image_ref=prevz.image_ref if prevz else "",
                        span_size=z.span_size,
                        media_type=si.ZTOC_MEDIA_TYPE,
                        created_at=prevz.created_at if prevz else "",
                        head_span=prevz.head_span if prevz else 0,
                    )
                )
                n_ztocs += 1
            # Prefetch artifacts have no database rows: indexes alone say which are in use.
            for p in index.prefetches:
                if not self.content.has(p.digest):
                    log.warning("index %s lists prefetch artifact %s, which is not in the store", d, p.digest)
        return len(indexes), n_ztocs

    def _platform_of(self, manifest: dict | None) -> str:
        if not manifest:
            return ""
        cfg = manifest.get("config") or {}
        try:
            doc = json.loads(self.content.read(cfg.get("digest", "")))
        except (SociError, ValueError):
            return ""
        if not isinstance(doc, dict) or not doc.get("os"):
            return ""
        parts = [doc.get("os"), doc.get("architecture")]
        if doc.get("variant"):
            parts.append(doc["variant"])
        return "/".join(str(p) for p in parts if p)


def layer_fetcher(store: Store, ztoc_digest: str, image: str | None, opts: SourceOptions) -> Fetch:
    """Where a zTOC's layer bytes come from: the local store if it has the blob, else its image's source."""
    entry = store.db.get(ztoc_digest)
    if entry is None or entry.type != TYPE_ZTOC:
        raise NotFound(f"no ztoc {ztoc_digest} in the local store")
    layer = entry.original_digest
    if store.content.has(layer):
        path = store.content.path(layer)

        def local(offset: int, length: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(length)

        return local
    spec = image or entry.image_ref
    if not spec:
        raise NotFound(f"layer {layer} is not local and no image is known for it; name one with --image")
    from ..oci.source import open_source

    source = open_source(spec, opts)
    size = store.load_ztoc(ztoc_digest).compressed_archive_size
    desc = Descriptor(media_type="application/octet-stream", digest=layer, size=size)

    def remote(offset: int, length: int) -> bytes:
        return source.read_blob_range(desc, offset, length)

    return remote
