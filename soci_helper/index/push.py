"""`soci push`: upload local v1 SOCI indexes and the blobs they list, and keep the referrers tag schema up to date."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import digest as dg
from ..errors import NotFound, RegistryError, SociError
from ..oci import mediatype as mt
from ..oci.registry import RegistryClient
from ..oci.source import ImageManifestInfo, RegistrySource, SourceOptions, open_source, select_images
from ..store.artifacts import ArtifactEntry
from . import soci_index as si
from .discover import api_referrers, referrers_tag, tag_referrers
from .ops import Store

log = logging.getLogger(__name__)

EXISTING_WARN = "warn"
EXISTING_SKIP = "skip"
EXISTING_ALLOW = "allow"
EXISTING_INDEX_OPTIONS = (EXISTING_WARN, EXISTING_SKIP, EXISTING_ALLOW)

# Blob events reported to the caller: (descriptor, "pushing" | "pushed" | "skipped").
BlobEvent = Callable[[dict[str, Any], str], None]
# Messages for the user: (kind, text). kind "info" is chatter, "warn" a warning, and "index" carries
# only the digest of an index about to be pushed (quiet output prints just that).
Message = Callable[[str, str], None]

# Concurrent pushers each read-modify-write the referrers tag; re-check a few times that ours survived.
_TAG_ATTEMPTS = 5


@dataclass(slots=True)
class PushResult:
    image_digest: str
    platform: str
    index_digest: str = ""
    skipped: bool = False  # --existing-index skip found an index already there
    existing: list[str] = field(default_factory=list)  # v1 indexes already in the registry before the push
    used_referrers_api: bool = False
    tag_updated: bool = False


def _referrer_descriptor(manifest: bytes) -> dict[str, Any]:
    """How the referrers tag lists a manifest: its descriptor plus artifactType and its annotations."""
    doc = json.loads(manifest)
    artifact_type = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
    media_type = doc.get("mediaType") or mt.OCI_MANIFEST
    return si.descriptor(media_type, dg.of_bytes(manifest), len(manifest), doc.get("annotations") or None,
                         artifactType=artifact_type)


def _referrers_index(manifests: list[dict[str, Any]]) -> bytes:
    return si.go_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests})


def add_referrer(client: RegistryClient, repo: str, subject_digest: str, manifest: bytes) -> bool:
    """List `manifest` under the referrers tag of `subject_digest`; True if the tag had to change.

    Other referrers (signatures, SBOMs) are kept as they are; a manifest already listed is not
    listed twice. The replaced tag index is deleted afterwards (best effort), as ORAS does, so
    that repeated pushes leave no untagged garbage behind.
    """
    mine = _referrer_descriptor(manifest)
    tag = referrers_tag(subject_digest)
    changed = False
    for _ in range(_TAG_ATTEMPTS):
        current, old_digest = tag_referrers(client, repo, subject_digest)
        if any(d.get("digest") == mine["digest"] for d in current):
            return changed
        data = _referrers_index([*current, mine])
        client.put_manifest(repo, tag, data, mt.OCI_INDEX)
        changed = True
        if old_digest and old_digest != dg.of_bytes(data):
            try:
                client.delete_manifest(repo, old_digest)
            except SociError as exc:
                # Deletion is often disabled on registries; a stale untagged index is harmless.
                log.debug("could not delete the replaced referrers index %s: %s", old_digest, exc)
        # Loop to re-read: another pusher may have replaced the tag between our read and write.
    raise RegistryError(f"registry {client.display}: referrers tag {repo}:{tag} keeps changing under us; try again")


def _local_index(store: Store, image: ImageManifestInfo) -> tuple[ArtifactEntry | None, bool]:
    """The newest local v1 index for an image manifest (as upstream picks it), and whether a v2 one exists."""
    entries = [e for e in store.db.indexes(image.descriptor.digest) if store.content.has(e.digest)]
    v2 = any(e.artifact_type == si.ARTIFACT_TYPE_V2 for e in entries)
    v1 = [e for e in entries if e.artifact_type != si.ARTIFACT_TYPE_V2]
    if not v1:
        return None, v2
    return max(v1, key=lambda e: (e.created_at, e.digest)), v2


def _existing_indexes(client: RegistryClient, repo: str, digest: str) -> tuple[list[str], bool]:
    """v1 index digests already referring to `digest`, and whether the registry has the referrers API."""
    refs = api_referrers(client, repo, digest, si.ARTIFACT_TYPE_V1)
    if refs is not None:
        return [d["digest"] for d in refs], True
    tagged, _ = tag_referrers(client, repo, digest)
    return [d["digest"] for d in tagged if d.get("artifactType") == si.ARTIFACT_TYPE_V1], False


def _push_blob(client: RegistryClient, repo: str, desc: dict[str, Any], data: Any, on_blob: BlobEvent) -> None:
    if client.head_blob(repo, desc["digest"]) is not None:
        on_blob(desc, "skipped")
        return
    on_blob(desc, "pushing")
    client.push_blob(repo, desc["digest"], desc["size"], data)
    on_blob(desc, "pushed")


def push(
    image_ref: str,
    store: Store,
    opts: SourceOptions,
    existing_index: str = EXISTING_WARN,
    message: Message | None = None,
    on_blob: BlobEvent | None = None,
) -> list[PushResult]:
    """Push the newest local v1 index of each selected platform image of `image_ref`, with its zTOCs.

    The image must be in the registry already. Blobs go first (HEAD, then upload only what is
    missing), then the index manifest by digest. Registries without the referrers API get the
    referrers tag `sha256-<hex>` updated. `existing_index` is upstream's policy for indexes that
    already refer to the image: warn (push anyway, say so), skip, or allow (do not even look).
    """
    if existing_index not in EXISTING_INDEX_OPTIONS:
        raise SociError(
            f"unexpected value for flag existing-index: {existing_index}, expected one of "
            f"{', '.join(EXISTING_INDEX_OPTIONS)}"
        )
    say: Message = message or (lambda _k, _t: None)
    blob_event: BlobEvent = on_blob or (lambda _d, _s: None)
    source = open_source(image_ref, opts)
    if not isinstance(source, RegistrySource):
        raise SociError(f"{image_ref}: push needs a registry reference (host/repo:tag or @digest)")
    client, repo = source.client, source.reference.repository
    images = select_images(source, opts)

    # Find everything first, so a missing index for one platform fails before anything is uploaded.
    plan: list[tuple[ImageManifestInfo, ArtifactEntry]] = []
    for image in images:
        entry, has_v2 = _local_index(store, image)
        if has_v2:
            say("warn", "[WARN] Skipping SOCI index manifest v2. You should push the whole image with higher level "
                "tools like finch or nerdctl.")
        if entry is None:
            raise NotFound(
                f"could not find any soci index manifest v1 to push for platform {image.platform_string() or '?'} "
                f"(image manifest {image.descriptor.digest}); run `soci create` first"
            )
        plan.append((image, entry))

    results: list[PushResult] = []
    for image, entry in plan:
        res = PushResult(image.descriptor.digest, image.platform_string(), entry.digest)
        results.append(res)
        has_api: bool | None = None
        if existing_index != EXISTING_ALLOW:
            say("info", "checking if a soci index already exists in remote repository...")
            res.existing, has_api = _existing_indexes(client, repo, image.descriptor.digest)
            if res.existing:
                if len(res.existing) > 1:
                    found = "multiple soci indices found in remote repository"
                else:
                    found = f"soci index found in remote repository with digest: {res.existing[0]}"
                if existing_index == EXISTING_SKIP:
                    say("info", f"{found}: skipping pushing artifacts for image manifest: {image.descriptor.digest}")
                    res.skipped = True
                    continue
                say("warn", f"[WARN] {found}: pushing index anyway")
        _push_index(client, repo, store, entry, image, res, has_api, blob_event, say)
    return results


def _push_index(client: RegistryClient, repo: str, store: Store, entry: ArtifactEntry, image: ImageManifestInfo,
                res: PushResult, has_api: bool | None, on_blob: BlobEvent, say: Message) -> None:
    data = store.content.read(entry.digest)
    index = si.parse(data, f"SOCI index {entry.digest}")
    subject = (index.subject or {}).get("digest")
    if subject != image.descriptor.digest:
        raise si.IndexFormatError(f"SOCI index {entry.digest}: its subject is not image manifest "
                                  f"{image.descriptor.digest}; rebuild it with `soci create`")
    say("index", entry.digest)
    for what, media_type, digest, size in index.blobs():
        if not store.content.has(digest):
            raise NotFound(f"SOCI index {entry.digest}: {what} {digest} is not in the local store; "
                           "rebuild it with `soci create -f`")
        _push_blob(client, repo, si.descriptor(media_type, digest, size), store.content.path(digest), on_blob)
    config = si.descriptor(index.artifact_type, si.EMPTY_CONFIG_DIGEST, len(si.EMPTY_CONFIG))
    _push_blob(client, repo, config, si.EMPTY_CONFIG, on_blob)
    manifest_desc = si.descriptor(si.MEDIA_TYPE_OCI_MANIFEST, entry.digest, len(data))
    if client.head_manifest(repo, entry.digest) is not None:
        on_blob(manifest_desc, "skipped")
    else:
        on_blob(manifest_desc, "pushing")
        client.put_manifest(repo, entry.digest, data, si.MEDIA_TYPE_OCI_MANIFEST)
        on_blob(manifest_desc, "pushed")
    if has_api is None:
        has_api = client.get_referrers(repo, image.descriptor.digest, si.ARTIFACT_TYPE_V1) is not None
    res.used_referrers_api = has_api
    if not has_api:
        # Checked even when the manifest was already there: it repairs a tag an earlier push left unfinished.
        res.tag_updated = add_referrer(client, repo, image.descriptor.digest, data)
