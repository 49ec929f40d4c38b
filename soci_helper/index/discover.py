"""Finding an image's SOCI index in a registry and fetching it, with its zTOCs, into the local store."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .. import digest as dg
from ..errors import NotFound, SociError
from ..oci import mediatype as mt
from ..oci.manifest import parse_index
from ..oci.registry import RegistryClient
from ..oci.source import ImageManifestInfo, RegistrySource, SourceOptions, open_source, select_manifests
from ..store.artifacts import TYPE_INDEX, TYPE_ZTOC, ArtifactEntry
from ..ztoc import codec, prefetch
from . import soci_index as si
from .ops import Store

log = logging.getLogger(__name__)

# How an index was found, in discovery order.
VIA_EXPLICIT = "explicit digest"
VIA_ANNOTATION = "index-digest annotation"
VIA_REFERRERS_API = "referrers API"
VIA_REFERRERS_TAG = "referrers tag"


class ReferrersFormatError(SociError):
    """A referrers list (API answer or referrers tag) is not an OCI image index."""


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: `sha256-<hex>`."""
    return "sha256-" + dg.hex_part(digest)


def parse_referrers(data: bytes, where: str) -> list[dict[str, Any]]:
    """The `manifests` of a referrers index, as raw descriptors (unknown fields kept)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ReferrersFormatError(f"{where}: not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ReferrersFormatError(f"{where}: not an OCI image index")
    out = []
    for i, d in enumerate(doc["manifests"]):
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("size"), int):
            raise ReferrersFormatError(f"{where}: manifests[{i}] is not a descriptor")
        out.append(d)
    return out


def api_referrers(client: RegistryClient, repo: str, digest: str,
                  artifact_type: str | None = None) -> list[dict[str, Any]] | None:
    """Referrers from the referrers API, filtered by artifact type; None when the registry lacks the API."""
    data = client.get_referrers(repo, digest, artifact_type)
    if data is None:
        return None
    refs = parse_referrers(data, f"registry {client.display}: referrers of {repo}@{digest}")
    # A registry may ignore the artifactType filter (the spec lets it), so filter again here.
    return [d for d in refs if not artifact_type or d.get("artifactType") == artifact_type]


def tag_referrers(client: RegistryClient, repo: str, digest: str) -> tuple[list[dict[str, Any]], str | None]:
    """The referrers tag schema's list for `digest` and the tag's current manifest digest (None if untagged)."""
    tag = referrers_tag(digest)
    try:
        data, desc = client.get_manifest(repo, tag)
    except NotFound:
        return [], None
    return parse_referrers(data, f"registry {client.display}: referrers tag {repo}:{tag}"), desc.digest


def _created(d: dict[str, Any]) -> datetime | None:
    value = (d.get("annotations") or {}).get(si.ANNOTATION_CREATED)
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Naive timestamps cannot be ordered against aware ones; treat them as absent.
    return t if t.tzinfo is not None else None


def choose_index(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """Pick one of several v1 index descriptors, the same one on every machine and every run.

    The newest by its `org.opencontainers.image.created` annotation wins; an index carrying that
    annotation beats one without; among equals (or when none has it) the lexically greatest digest wins.
    """
    def key(d: dict[str, Any]) -> tuple[int, float, str]:
        t = _created(d)
        return (1 if t is not None else 0, t.timestamp() if t is not None else 0.0, str(d["digest"]))

    return max(candidates, key=key)


@dataclass(slots=True)
class DiscoveredIndex:
    """A SOCI index found for an image manifest and now held, with its zTOCs, in the local store."""

    digest: str
    size: int
    index: si.SociIndex
    image_digest: str  # the platform image manifest the index serves
    image_ref: str
    platform: str
    found_via: str
    ztocs: list[str] = field(default_factory=list)
    candidates: int = 1  # how many v1 indexes the registry listed, when found through referrers
    prefetches: list[str] = field(default_factory=list)  # the prefetch artifacts now in the store


def _v2_from_image_index(source: RegistrySource, image_digest: str) -> str | None:
    # The converted image's index lists the SOCI index descriptor next to the image manifest.
    if source.reference.digest == image_digest:
        return None  # the reference names the image manifest itself: there is no index above it to read
    top = source.resolve()
    if mt.base_type(top.media_type) not in mt.INDEXES:
        return None
    for d in parse_index(source.fetch_manifest(top), top.media_type).manifests:
        names = d.annotations.get(si.ANNOTATION_IMAGE_MANIFEST_DIGEST)
        if d.artifact_type == si.ARTIFACT_TYPE_V2 and names == image_digest:
            return d.digest
    return None


def _locate(source: RegistrySource, image: ImageManifestInfo, explicit: str | None) -> tuple[str, str, int]:
    """(index digest, how it was found, number of candidates)."""
    if explicit:
        return dg.validate(explicit), VIA_EXPLICIT, 1
    digest = image.descriptor.digest
    annotated = image.manifest.annotations.get(si.ANNOTATION_INDEX_DIGEST)
    if annotated:
        return dg.validate(annotated), VIA_ANNOTATION, 1
    v2 = _v2_from_image_index(source, digest)
    if v2:
        return v2, VIA_ANNOTATION, 1
    client, repo = source.client, source.reference.repository
    refs = api_referrers(client, repo, digest, si.ARTIFACT_TYPE_V1)
    if refs:
        return choose_index(refs)["digest"], VIA_REFERRERS_API, len(refs)
    # Also consulted when the API answers with nothing: the tag may predate a registry upgrade.
    tagged, _ = tag_referrers(client, repo, digest)
    tagged = [d for d in tagged if d.get("artifactType") == si.ARTIFACT_TYPE_V1]
    if tagged:
        return choose_index(tagged)["digest"], VIA_REFERRERS_TAG, len(tagged)
    raise NotFound(
        f"no SOCI index for {source.ref} (image manifest {digest}): no index-digest annotation, "
        f"no v1 index among its referrers"
    )


def discover(image_ref: str, opts: SourceOptions, store: Store, explicit_index_digest: str | None = None,
             platform: str | None = None, image: ImageManifestInfo | None = None,
             check_entries: bool = True) -> DiscoveredIndex:
    """Find the SOCI index for one platform image of `image_ref` and fetch it and its zTOCs locally.

    Order (first hit wins): `explicit_index_digest`; the image manifest's `com.amazon.soci.index-digest`
    annotation (v2; the image index's SOCI descriptor with the v2 artifactType names it as well); v1
    indexes from the referrers API; v1 indexes from the referrers tag `sha256-<hex>`.

    When several v1 indexes refer to the image, the choice is deterministic: the newest by the
    `org.opencontainers.image.created` annotation on its referrer descriptor (an index that has the
    annotation beats one that does not), else the lexically greatest digest.

    Every blob is verified against its digest before it enters the store; the index and zTOCs are
    recorded in the artifacts database. NotFound when the image has no index.

    `image` is the platform image of `image_ref` when the caller has fetched (and verified) it already;
    `platform` is then ignored. Without `check_entries` only each zTOC's header and compression info are
    checked here, for a caller that is about to mount the layers (which decodes and checks the entries):
    decoding python-scipy's 31,000-entry zTOC here as well cost a lazy start 0.38 s.
    """
    source = open_source(image_ref, opts)
    if not isinstance(source, RegistrySource):
        raise SociError(f"{image_ref}: discovery needs a registry reference (host/repo:tag or @digest)")
    if image is None:
        image = select_manifests(source, platform)[0]
    index_digest, via, n = _locate(source, image, explicit_index_digest)
    client, repo = source.client, source.reference.repository
    where = f"SOCI index {index_digest}"
    data, _ = client.get_manifest(repo, index_digest)
    index = si.parse(data, where)
    if via in (VIA_REFERRERS_API, VIA_REFERRERS_TAG) and (index.subject or {}).get("digest") != image.descriptor.digest:
        raise si.IndexFormatError(f"{where}: its subject is not image manifest {image.descriptor.digest}")
    fetched = []
    for z in index.ztocs:
        fresh = not store.content.has(z.digest)
        if fresh:
            # The client checks the digest as it streams: a zTOC is hashed once, not once per step.
            store.content.ingest(client.open_blob(repo, z.digest, z.size), z.digest, verified=True)
        try:
            # Reading verifies the digest of a blob that was already here; decoding catches a blob that
            # matches its digest but is no zTOC, now rather than at mount time.
            raw = store.content.read(z.digest, verify=not fresh)
            if check_entries:
                codec.decode(raw)
            else:
                codec.decode_raw(raw)
        except SociError as exc:
            store.content.delete(z.digest)
            raise SociError(f"{where}: zTOC {z.digest} for layer {z.layer_digest}: {exc}") from None
        store.db.put(ArtifactEntry(
            digest=z.digest, type=TYPE_ZTOC, size=z.size, original_digest=z.layer_digest, image_ref=source.ref,
            span_size=z.span_size, media_type=si.ZTOC_MEDIA_TYPE,
        ))
        fetched.append(z.digest)
    prefetches = _fetch_prefetches(client, repo, index, store, where)
    # The index goes in last, so a store never lists an index whose zTOCs are missing.
    store.content.write(data, index_digest)
    store.content.write(image.raw, image.descriptor.digest)
    store.db.put(ArtifactEntry(
        digest=index_digest, type=TYPE_INDEX, size=len(data), original_digest=image.descriptor.digest,
        image_digest=image.descriptor.digest, image_ref=source.ref, platform=image.platform_string(),
        media_type=si.MEDIA_TYPE_OCI_MANIFEST, artifact_type=index.artifact_type,
    ))
    log.info("discovered SOCI index %s for %s via %s (%d zTOCs, %d prefetch artifacts)", index_digest,
             image.descriptor.digest, via, len(fetched), len(prefetches))
    return DiscoveredIndex(index_digest, len(data), index, image.descriptor.digest, source.ref,
                           image.platform_string(), via, fetched, n, prefetches)


# An artifact lists span ranges of one layer; anything bigger than this is not one.
MAX_PREFETCH_ARTIFACT = 4 << 20


def _fetch_prefetches(client: RegistryClient, repo: str, index: si.SociIndex, store: Store, where: str) -> list[str]:
    """Fetch the index's prefetch artifacts. They only speed a start up: one that cannot be fetched or
    read is left out with a warning (its layer mounts without it), never a reason to fail discovery."""
    out = []
    for p in index.prefetches:
        try:
            if p.size > MAX_PREFETCH_ARTIFACT:
                raise SociError(f"{p.size} bytes is too big for a prefetch artifact")
            if not store.content.has(p.digest):
                store.content.ingest(client.open_blob(repo, p.digest, p.size), p.digest, verified=True)
            prefetch.decode(store.content.read(p.digest))
        except SociError as exc:
            log.warning("%s: prefetch artifact %s for layer %s left out: %s", where, p.digest, p.layer_digest, exc)
            store.content.delete(p.digest)
            continue
        out.append(p.digest)
    return out
