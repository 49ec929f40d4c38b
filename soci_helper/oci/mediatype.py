"""Media types of OCI and Docker v2 schema 2 objects, and how layer blobs are compressed."""

from __future__ import annotations

import enum

# OCI image-spec
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
# Registries refuse it (see the design notes), but we still recognise it when reading.
OCI_ARTIFACT_MANIFEST = "application/vnd.oci.artifact.manifest.v1+json"

# Docker image manifest v2 schema 2
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
# Schema 1 is only recognised so that it can be refused clearly.
DOCKER_MANIFEST_V1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_MANIFEST_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# SOCI artifacts
SOCI_INDEX_V1 = "application/vnd.amazon.soci.index.v1+json"
SOCI_INDEX_V2 = "application/vnd.amazon.soci.index.v2+json"
SOCI_LAYER = "application/octet-stream"

IMAGE_MANIFESTS = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEXES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFESTS | INDEXES

# The Accept header for manifest requests: everything we can parse, OCI first.
MANIFEST_ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])


class Compression(enum.Enum):
    GZIP = "gzip"
    ZSTD = "zstd"
    UNCOMPRESSED = "uncompressed"
    UNKNOWN = "unknown"


def base_type(media_type: str) -> str:
    """The media type without parameters (`; charset=...`), lower-cased and trimmed."""
    return media_type.split(";", 1)[0].strip().lower()


def is_image_manifest(media_type: str) -> bool:
    return base_type(media_type) in IMAGE_MANIFESTS


def is_index(media_type: str) -> bool:
    return base_type(media_type) in INDEXES


def is_manifest(media_type: str) -> bool:
    """True for anything served from `/manifests/`: image manifests and indexes."""
    return base_type(media_type) in MANIFEST_TYPES


def is_docker(media_type: str) -> bool:
    return base_type(media_type).startswith("application/vnd.docker.")


def is_layer(media_type: str) -> bool:
    """True for image filesystem layers (OCI, Docker, foreign and non-distributable)."""
    mt = base_type(media_type)
    return mt.startswith(
        (
            "application/vnd.oci.image.layer.",
            "application/vnd.docker.image.rootfs.",
        )
    )


def is_non_distributable(media_type: str) -> bool:
    """Layers a registry may not hold (`urls` point elsewhere): OCI non-distributable and Docker foreign."""
    mt = base_type(media_type)
    return mt.startswith(
        (
            "application/vnd.oci.image.layer.nondistributable.",
            "application/vnd.docker.image.rootfs.foreign.",
        )
    )


def layer_compression(media_type: str) -> Compression:
    """Classify a layer's compression from its media type alone.

    Suffix rules cover the registered types and their variants (`+gzip`,
    `.tar.gzip`, `+zstd`); encrypted or otherwise wrapped layers (`+encrypted`)
    and non-layer types are UNKNOWN.
    """
    mt = base_type(media_type)
    if not is_layer(mt):
        return Compression.UNKNOWN
    if mt.endswith(("+gzip", ".tar.gzip", ".tar.gz")):
        return Compression.GZIP
    if mt.endswith(("+zstd", ".tar.zstd")):
        return Compression.ZSTD
    if mt.endswith(".tar"):
        return Compression.UNCOMPRESSED
    return Compression.UNKNOWN
