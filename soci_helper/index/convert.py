"""`soci convert`: rewrite an image as a SOCI-enabled image index carrying v2 SOCI indexes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import digest as dg
from ..errors import SociError
from ..oci import mediatype
from ..oci.manifest import Descriptor
from ..oci.source import ImageManifestInfo, ImageSource, SourceOptions, open_source, select_images
from ..store.artifacts import TYPE_INDEX, ArtifactEntry
from . import soci_index as si
from .build import BuildOptions, IndexBuilder, IndexResult, LayerProgress, LayerResult
from .ops import Store

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ConvertResult:
    digest: str
    size: int
    manifests: list[tuple[str, str]]  # (image manifest digest, its SOCI index digest)


def _copy_blob(src: ImageSource, dst: ImageSource, desc: Descriptor) -> None:
    if dst.has_blob(desc):
        return
    # Spool through a temporary file: layers can be larger than memory, and a registry upload
    # needs the whole length up front for a monolithic PUT.
    fd, tmp = tempfile.mkstemp(prefix="soci-convert-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in src.open_blob(desc):
                f.write(chunk)
        dst.push_blob(desc, tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _platform_json(image: ImageManifestInfo) -> dict[str, Any]:
    if image.platform is None:
        return {}
    return image.platform.to_json()


def convert(
    src_spec: str,
    dst_spec: str,
    store: Store,
    opts: SourceOptions,
    build: BuildOptions,
    on_layer: Callable[[LayerResult], None] | None = None,
    progress: LayerProgress | None = None,
    on_index: Callable[[IndexResult], None] | None = None,
) -> ConvertResult:
    src = open_source(src_spec, opts)
    dst = open_source(dst_spec, opts, create=True)
    if not dst.writable:
        raise SociError(f"{dst_spec}: cannot write a converted image there (use a registry reference or oci:DIR)")
    images = select_images(src, opts)
    build.artifact_type = si.ARTIFACT_TYPE_V2
    builder = IndexBuilder(store.content, store.db, build)
    entries: list[dict[str, Any]] = []
    soci_entries: list[dict[str, Any]] = []
    pairs: list[tuple[str, str]] = []
    for image in images:
        result = builder.build_index(src, image, src.ref, on_layer, progress)
        if on_index is not None:
            on_index(result)
        for blob in [image.manifest.config, *image.manifest.layers]:
            _copy_blob(src, dst, blob)
        for _, media_type, digest, size in result.index.blobs():
            dst.push_blob(Descriptor(media_type=media_type, digest=digest, size=size), str(store.content.path(digest)))
        empty = Descriptor(media_type=si.ARTIFACT_TYPE_V2, digest=si.EMPTY_CONFIG_DIGEST, size=len(si.EMPTY_CONFIG))
        if not dst.has_blob(empty):
            dst.push_blob(empty, si.EMPTY_CONFIG)
        index_bytes = store.content.read(result.digest)
        dst.push_manifest(index_bytes, si.MEDIA_TYPE_OCI_MANIFEST)

        doc = json.loads(image.raw)
        annotations = dict(doc.get("annotations") or {})
        annotations[si.ANNOTATION_INDEX_DIGEST] = result.digest
        doc["annotations"] = dict(sorted(annotations.items()))
        new_manifest = si.go_json(doc)
        media_type = image.descriptor.media_type
        new_desc = dst.push_manifest(new_manifest, media_type)
        store.content.write(new_manifest)
        # The converted manifest is what a runtime will resolve, so discovery keys on it.
        store.db.put(
            ArtifactEntry(
                digest=result.digest,
                type=TYPE_INDEX,
                size=result.size,
                original_digest=new_desc.digest,
                image_digest=new_desc.digest,
                image_ref=dst.ref,
                platform=image.platform_string(),
                media_type=si.MEDIA_TYPE_OCI_MANIFEST,
                artifact_type=si.ARTIFACT_TYPE_V2,
            )
        )
        platform = _platform_json(image)
        entries.append(si.descriptor(media_type, new_desc.digest, new_desc.size, platform=platform))
        soci_entries.append(
            si.descriptor(
                si.MEDIA_TYPE_OCI_MANIFEST,
                result.digest,
                result.size,
                {si.ANNOTATION_IMAGE_MANIFEST_DIGEST: new_desc.digest},
                platform=platform,
                artifactType=si.ARTIFACT_TYPE_V2,
            )
        )
        pairs.append((new_desc.digest, result.digest))
    index_doc = {"schemaVersion": 2, "mediaType": mediatype.OCI_INDEX, "manifests": entries + soci_entries}
    data = si.go_json(index_doc)
    top = dst.push_manifest(data, mediatype.OCI_INDEX, tag=dst.tag or "latest")
    log.info("converted %s to %s as %s", src.ref, dst.ref, top.digest)
    return ConvertResult(dg.of_bytes(data), len(data), pairs)
