"""Descriptors, image manifests and indexes: validated parsing and Go-compatible canonical JSON."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import digest as _digest
from ..errors import DigestError, ReferenceError_
from . import mediatype as mt
from .platform import Platform

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


class ManifestError(ReferenceError_):
    """A manifest, index or descriptor is malformed or not of a supported kind."""


def canonical_json(obj: Any) -> bytes:
    """Serialise like Go's encoding/json.Marshal: compact, UTF-8, HTML-safe escapes.

    Key order is the caller's (build dicts in Go struct order); map-typed
    fields such as annotations must already be sorted, as Go sorts map keys.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    # These characters only ever occur inside JSON strings, so replacing them
    # in the whole text is safe; Go escapes them to keep JSON embeddable in HTML.
    text = (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )
    return text.encode("utf-8")


def _sorted_map(m: Mapping[str, str]) -> dict[str, str]:
    return {k: m[k] for k in sorted(m)}


def _req(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise ManifestError(f"invalid {what}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ManifestError(f"invalid {what}: {key!r} has the wrong type")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ManifestError(f"invalid {what}: {key!r} must be a string")
    return value or None


def _annotations(obj: Mapping[str, Any], what: str) -> dict[str, str]:
    value = obj.get("annotations")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestError(f"invalid {what}: annotations must map strings to strings")
    return dict(value)


@dataclass
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: list[str] = field(default_factory=list)
    data: bytes | None = None

    def __post_init__(self) -> None:
        _digest.validate(self.digest)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ManifestError(f"invalid descriptor {self.digest}: size must be a non-negative integer")

    def to_json(self) -> dict[str, Any]:
        # Order of image-spec's Go Descriptor struct, omitempty fields left out.
        out: dict[str, Any] = {}
        if self.media_type:
            out["mediaType"] = self.media_type
        out["digest"] = self.digest
        out["size"] = self.size
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = _sorted_map(self.annotations)
        if self.data:
            out["data"] = base64.b64encode(self.data).decode("ascii")
        if self.platform is not None:
            out["platform"] = self.platform.to_json()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @classmethod
    def from_json(cls, obj: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestError(f"invalid {what}: not a JSON object")
        media_type = _req(obj, "mediaType", str, what)
        if not media_type:
            raise ManifestError(f"invalid {what}: empty mediaType")
        digest = _req(obj, "digest", str, what)
        try:
            _digest.validate(digest)
        except DigestError as e:
            raise DigestError(f"invalid {what}: {e}") from None
        size = _req(obj, "size", int, what)
        if size < 0:
            raise ManifestError(f"invalid {what} {digest}: negative size {size}")
        urls = obj.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ManifestError(f"invalid {what} {digest}: urls must be a list of strings")
        data: bytes | None = None
        if obj.get("data") is not None:
            if not isinstance(obj["data"], str):
                raise ManifestError(f"invalid {what} {digest}: data must be a base64 string")
            try:
                data = base64.b64decode(obj["data"], validate=True)
            except binascii.Error:
                raise ManifestError(f"invalid {what} {digest}: data is not valid base64") from None
            if len(data) != size or _digest.of_bytes(data) != digest:
                raise DigestError(f"invalid {what} {digest}: embedded data does not match digest/size")
        plat = None
        if obj.get("platform") is not None:
            try:
                plat = Platform.from_json(obj["platform"])
            except ReferenceError_ as e:
                raise ManifestError(f"invalid {what} {digest}: {e}") from None
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=_annotations(obj, what),
            platform=plat,
            artifact_type=_opt_str(obj, "artifactType", what),
            urls=list(urls),
            data=data,
        )

    @classmethod
    def for_bytes(cls, media_type: str, data: bytes, **kw: Any) -> Descriptor:
        return cls(media_type=media_type, digest=_digest.of_bytes(data), size=len(data), **kw)


@dataclass
class ImageManifest:
    config: Descriptor
    layers: list[Descriptor]
    media_type: str | None = mt.OCI_MANIFEST
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    schema_version: int = 2

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": self.schema_version}
        if self.media_type:
            out["mediaType"] = self.media_type
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["config"] = self.config.to_json()
        out["layers"] = [d.to_json() for d in self.layers]
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = _sorted_map(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def descriptor(self, **kw: Any) -> Descriptor:
        """A descriptor of `to_bytes()` (what we would push)."""
        return Descriptor.for_bytes(self.media_type or mt.OCI_MANIFEST, self.to_bytes(), **kw)


@dataclass
class ImageIndex:
    manifests: list[Descriptor]
    media_type: str | None = mt.OCI_INDEX
    artifact_type: str | None = None
    subject: Descriptor | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    schema_version: int = 2

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schemaVersion": self.schema_version}
        if self.media_type:
            out["mediaType"] = self.media_type
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        out["manifests"] = [d.to_json() for d in self.manifests]
        if self.subject is not None:
            out["subject"] = self.subject.to_json()
        if self.annotations:
            out["annotations"] = _sorted_map(self.annotations)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def descriptor(self, **kw: Any) -> Descriptor:
        return Descriptor.for_bytes(self.media_type or mt.OCI_INDEX, self.to_bytes(), **kw)


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ManifestError(f"invalid {what}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"invalid {what}: not a JSON object")
    version = obj.get("schemaVersion")
    if version == 1:
        raise ManifestError(f"unsupported {what}: Docker schema 1 manifests are not supported")
    if version != 2 or isinstance(version, bool):
        raise ManifestError(f"invalid {what}: schemaVersion must be 2, got {version!r}")
    return obj


def _check_media_type(obj: Mapping[str, Any], media_type: str | None, allowed: frozenset[str],
                      what: str) -> str | None:
    declared = _opt_str(obj, "mediaType", what)
    if declared is not None and media_type is not None and mt.base_type(declared) != mt.base_type(media_type):
        raise ManifestError(
            f"invalid {what}: mediaType {declared!r} does not match the declared type {media_type!r}"
        )
    effective = declared or media_type
    if effective is not None and mt.base_type(effective) not in allowed:
        raise ManifestError(f"invalid {what}: unexpected mediaType {effective!r}")
    return declared


def _subject(obj: Mapping[str, Any], what: str) -> Descriptor | None:
    if obj.get("subject") is None:
        return None
    return Descriptor.from_json(obj["subject"], f"{what} subject")


def parse_image_manifest(data: bytes, media_type: str | None = None) -> ImageManifest:
    """Parse and validate an OCI or Docker schema 2 image manifest."""
    what = "image manifest"
    obj = _load(data, what)
    declared = _check_media_type(obj, media_type, mt.IMAGE_MANIFESTS, what)
    if "manifests" in obj and "config" not in obj:
        raise ManifestError(f"invalid {what}: this is an index, not an image manifest")
    if declared is None and media_type is not None and mt.is_docker(media_type):
        raise ManifestError(f"invalid {what}: Docker manifests must carry mediaType")
    config = Descriptor.from_json(_req(obj, "config", dict, what), f"{what} config")
    layers_raw = obj.get("layers")
    if layers_raw is None:
        layers_raw = []
    if not isinstance(layers_raw, list):
        raise ManifestError(f"invalid {what}: 'layers' must be a list")
    layers = [Descriptor.from_json(d, f"{what} layer {i}") for i, d in enumerate(layers_raw)]
    return ImageManifest(
        config=config,
        layers=layers,
        media_type=declared,
        artifact_type=_opt_str(obj, "artifactType", what),
        subject=_subject(obj, what),
        annotations=_annotations(obj, what),
    )


def parse_index(data: bytes, media_type: str | None = None) -> ImageIndex:
    """Parse and validate an OCI image index or Docker manifest list."""
    what = "image index"
    obj = _load(data, what)
    declared = _check_media_type(obj, media_type, mt.INDEXES, what)
    if "config" in obj and "manifests" not in obj:
        raise ManifestError(f"invalid {what}: this is an image manifest, not an index")
    raw = _req(obj, "manifests", list, what)
    manifests = [Descriptor.from_json(d, f"{what} entry {i}") for i, d in enumerate(raw)]
    return ImageIndex(
        manifests=manifests,
        media_type=declared,
        artifact_type=_opt_str(obj, "artifactType", what),
        subject=_subject(obj, what),
        annotations=_annotations(obj, what),
    )


def detect_media_type(data: bytes, hint: str | None = None) -> str:
    """The manifest media type of `data`: `hint` if it is one, else the mediaType field, else by shape."""
    if hint and mt.is_manifest(hint):
        return mt.base_type(hint)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ManifestError("invalid manifest: not valid JSON") from None
    if not isinstance(obj, dict):
        raise ManifestError("invalid manifest: not a JSON object")
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return mt.base_type(declared)
    if obj.get("schemaVersion") == 1:
        return mt.DOCKER_MANIFEST_V1
    if "manifests" in obj:
        return mt.OCI_INDEX
    if "config" in obj:
        return mt.OCI_MANIFEST
    raise ManifestError("invalid manifest: neither an image manifest nor an index")


def parse_manifest(data: bytes, media_type: str | None = None) -> ImageManifest | ImageIndex:
    """Parse either kind; `media_type` (e.g. a Content-Type) is checked against the content."""
    kind = detect_media_type(data, media_type)
    if kind in mt.INDEXES:
        return parse_index(data, media_type)
    if kind in mt.IMAGE_MANIFESTS:
        return parse_image_manifest(data, media_type)
    if kind in (mt.DOCKER_MANIFEST_V1, mt.DOCKER_MANIFEST_V1_SIGNED):
        raise ManifestError("unsupported manifest: Docker schema 1 manifests are not supported")
    raise ManifestError(f"unsupported manifest media type {kind!r}")
