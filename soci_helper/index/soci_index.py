"""The SOCI index manifest (v1 and v2): constants, serialization and validated parsing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import digest as dg
from ..errors import SociError

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE_V1 = "application/vnd.amazon.soci.index.v1+json"
ARTIFACT_TYPE_V2 = "application/vnd.amazon.soci.index.v2+json"
ZTOC_MEDIA_TYPE = "application/octet-stream"
# Upstream's span-range prefetch artifact: one per layer, listed among the index's layers.
PREFETCH_MEDIA_TYPE = "application/vnd.amazon.soci.prefetch.v1+json"

ANNOTATION_LAYER_DIGEST = "com.amazon.soci.image-layer-digest"
ANNOTATION_LAYER_MEDIA_TYPE = "com.amazon.soci.image-layer-mediaType"
ANNOTATION_SPAN_SIZE = "com.amazon.soci.span-size"
ANNOTATION_BUILD_TOOL = "com.amazon.soci.build-tool-identifier"
ANNOTATION_INDEX_DIGEST = "com.amazon.soci.index-digest"
ANNOTATION_IMAGE_MANIFEST_DIGEST = "com.amazon.soci.image-manifest-digest"
ANNOTATION_CREATED = "org.opencontainers.image.created"

EMPTY_CONFIG = b"{}"
EMPTY_CONFIG_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


class IndexFormatError(SociError):
    """A SOCI index manifest is malformed."""


@dataclass(slots=True)
class ZtocRef:
    """A zTOC as the index lists it: the zTOC blob and the layer it indexes."""

    digest: str
    size: int
    layer_digest: str
    layer_media_type: str
    span_size: int


@dataclass(slots=True)
class PrefetchRef:
    """A prefetch artifact as the index lists it: the spans of one layer to fetch when it is mounted."""

    digest: str
    size: int
    layer_digest: str


@dataclass(slots=True)
class SociIndex:
    artifact_type: str
    ztocs: list[ZtocRef]
    build_tool: str = ""
    subject: dict[str, Any] | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    prefetches: list[PrefetchRef] = field(default_factory=list)

    @property
    def version(self) -> str:
        return "v2" if self.artifact_type == ARTIFACT_TYPE_V2 else "v1"

    def ztoc_for_layer(self, layer_digest: str) -> ZtocRef | None:
        for z in self.ztocs:
            if z.layer_digest == layer_digest:
                return z
        return None

    def blobs(self) -> list[tuple[str, str, str, int]]:
        """(what, media type, digest, size) of each blob the index lists besides its config: the zTOCs, then
        the prefetch artifacts, in the index's order (what push and convert upload, and index rm removes)."""
        out = [("zTOC", ZTOC_MEDIA_TYPE, z.digest, z.size) for z in self.ztocs]
        out += [("prefetch artifact", PREFETCH_MEDIA_TYPE, p.digest, p.size) for p in self.prefetches]
        return out

    def prefetch_for_layer(self, layer_digest: str) -> PrefetchRef | None:
        for p in self.prefetches:
            if p.layer_digest == layer_digest:
                return p
        return None


def descriptor(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None,
                **extra: Any) -> dict[str, Any]:
    # Key order follows Go's ocispec.Descriptor (image-spec 1.1: mediaType, digest, size, urls,
    # annotations, data, platform, artifactType) so the JSON matches upstream's byte for byte.
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = dict(sorted(annotations.items()))
    if extra.get("platform"):
        d["platform"] = extra["platform"]
    if extra.get("artifactType"):
        d["artifactType"] = extra["artifactType"]
    return d


def go_json(obj: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it (HTML-safe escapes, UTF-8, no spaces)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def serialize(index: SociIndex) -> bytes:
    layers = [
        descriptor(
            ZTOC_MEDIA_TYPE,
            z.digest,
            z.size,
            {
                ANNOTATION_LAYER_DIGEST: z.layer_digest,
                ANNOTATION_LAYER_MEDIA_TYPE: z.layer_media_type,
                ANNOTATION_SPAN_SIZE: str(z.span_size),
            },
        )
        for z in index.ztocs
    ]
    # After the zTOCs, as upstream lists them.
    layers += [descriptor(PREFETCH_MEDIA_TYPE, p.digest, p.size, {ANNOTATION_LAYER_DIGEST: p.layer_digest})
               for p in index.prefetches]
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": descriptor(index.artifact_type, EMPTY_CONFIG_DIGEST, len(EMPTY_CONFIG)),
        "layers": layers,
    }
    if index.subject is not None:
        manifest["subject"] = index.subject
    annotations = dict(index.annotations)
    annotations[ANNOTATION_BUILD_TOOL] = index.build_tool
    manifest["annotations"] = dict(sorted(annotations.items()))
    return go_json(manifest)


def parse(data: bytes, where: str = "SOCI index") -> SociIndex:
    """Parse and validate a SOCI index manifest; IndexFormatError with one clear line if bad."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise IndexFormatError(f"{where}: not an OCI manifest with schemaVersion 2")
    cfg = doc.get("config")
    if not isinstance(cfg, dict):
        raise IndexFormatError(f"{where}: missing config descriptor")
    artifact_type = doc.get("artifactType") or cfg.get("mediaType")
    if artifact_type not in (ARTIFACT_TYPE_V1, ARTIFACT_TYPE_V2):
        raise IndexFormatError(f"{where}: artifact type {artifact_type!r} is not a SOCI index")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise IndexFormatError(f"{where}: missing layers list")
    ztocs: list[ZtocRef] = []
    prefetches: list[PrefetchRef] = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise IndexFormatError(f"{where}: layer {i} is not a descriptor")
        ann = layer.get("annotations") or {}
        if not isinstance(ann, dict):
            raise IndexFormatError(f"{where}: layer {i} has annotations that are not an object")
        if layer.get("mediaType") == PREFETCH_MEDIA_TYPE:
            try:
                size = layer.get("size")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise ValueError("bad size")
                prefetches.append(PrefetchRef(dg.validate(layer.get("digest")),  # type: ignore[arg-type]
                                              size, dg.validate(ann.get(ANNOTATION_LAYER_DIGEST))))
            except (SociError, ValueError, TypeError) as exc:
                raise IndexFormatError(f"{where}: prefetch descriptor {i} is invalid ({exc})") from None
            continue
        try:
            ztoc_digest = dg.validate(layer.get("digest"))  # type: ignore[arg-type]
            layer_digest = dg.validate(ann.get(ANNOTATION_LAYER_DIGEST))
            size = layer.get("size")
            if not isinstance(size, int) or size < 0:
                raise ValueError("bad size")
            span = ann.get(ANNOTATION_SPAN_SIZE)
            span_size = int(span) if span is not None else 0
            if span_size < 0:
                raise ValueError("bad span size")
        except (SociError, ValueError, TypeError) as exc:
            raise IndexFormatError(f"{where}: zTOC descriptor {i} is invalid ({exc})") from None
        ztocs.append(ZtocRef(ztoc_digest, size, layer_digest, str(ann.get(ANNOTATION_LAYER_MEDIA_TYPE, "")), span_size))
    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise IndexFormatError(f"{where}: annotations is not an object")
    subject = doc.get("subject")
    if subject is not None and (not isinstance(subject, dict) or "digest" not in subject):
        raise IndexFormatError(f"{where}: subject is not a descriptor")
    return SociIndex(
        artifact_type=artifact_type,
        ztocs=ztocs,
        build_tool=str(annotations.get(ANNOTATION_BUILD_TOOL, "")),
        subject=subject,
        annotations={k: v for k, v in annotations.items() if k != ANNOTATION_BUILD_TOOL},
        prefetches=prefetches,
    )
