"""Image sources (registry, `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`) behind one API; platform selection."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import digest as _digest
from ..config import Config
from ..errors import DigestError, NotFound, ReferenceError_
from . import mediatype as mt
from .auth import resolve_credentials
from .layout import OCIArchive, OCILayout, _LayoutReader
from .manifest import Descriptor, ImageManifest, ManifestError, parse_image_manifest, parse_index
from .platform import Platform, host_platform, match_rank, normalize, parse_platform
from .reference import Reference, parse_reference
from .registry import RegistryClient, RegistryOptions, get_client

BlobData = bytes | str | Path | Iterable[bytes]


@dataclass(frozen=True)
class SourceOptions:
    plain_http: bool = False
    skip_verify: bool = False
    ca_file: str | None = None
    user: str | None = None  # "USER:PASSWORD"; never logged
    platform: str | None = None  # "os/arch[/variant]"
    all_platforms: bool = False
    config: Config | None = None  # [http] retries and timeouts, [resolver] mirrors; defaults when None


class ImageSource:
    """Where an image is read from (and, for registries and layout dirs, written to)."""

    ref: str = ""
    tag: str | None = None  # the tag the source names, if any; where push_manifest(tag=...) goes
    writable: bool = False

    def resolve(self) -> Descriptor:
        """The top-level manifest or index the source names."""
        raise NotImplementedError

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        """A manifest's bytes, verified against `desc.digest`."""
        raise NotImplementedError

    def open_blob(self, desc: Descriptor) -> Iterator[bytes]:
        """A blob's bytes in chunks; DigestError after the last chunk if they do not match."""
        raise NotImplementedError

    def read_blob(self, desc: Descriptor) -> bytes:
        return b"".join(self.open_blob(desc))

    def read_blob_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of a blob, clipped at its end; not digest-checked."""
        raise NotImplementedError

    def has_blob(self, desc: Descriptor) -> bool:
        raise NotImplementedError

    def push_blob(self, desc: Descriptor, data: BlobData) -> None:
        raise ReferenceError_(f"{self.ref}: this image source is read-only")

    def push_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        raise ReferenceError_(f"{self.ref}: this image source is read-only")

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return self.ref


def _verify_manifest(data: bytes, desc: Descriptor, where: str) -> bytes:
    got = _digest.of_bytes(data)
    if got != desc.digest or len(data) != desc.size:
        raise DigestError(f"{where}: manifest {desc.digest}: content is {got} ({len(data)} bytes)")
    return data


class RegistrySource(ImageSource):
    writable = True

    def __init__(self, reference: Reference, client: RegistryClient) -> None:
        self.reference = reference
        self.client = client
        self.ref = str(reference)
        self.tag = reference.tag
        # Manifests already fetched, by digest, so resolve() + fetch_manifest() is one request.
        self._manifests: dict[str, bytes] = {}
        self._top: Descriptor | None = None

    def resolve(self) -> Descriptor:
        """The top-level manifest, asked for once per source: every step of one command then works on the same
        image, and a tag is not fetched again by each of them."""
        if self._top is None:
            data, desc = self.client.get_manifest(self.reference.repository, self.reference.object)
            self._manifests[desc.digest] = data
            self._top = desc
        return self._top

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        cached = self._manifests.get(desc.digest)
        if cached is not None:
            return _verify_manifest(cached, desc, self.ref)
        data, _ = self.client.get_manifest(self.reference.repository, desc.digest)
        self._manifests[desc.digest] = data
        return _verify_manifest(data, desc, self.ref)

    def open_blob(self, desc: Descriptor) -> Iterator[bytes]:
        return self.client.open_blob(self.reference.repository, desc.digest, desc.size)

    def read_blob_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        if offset >= desc.size:
            return b""
        length = min(length, desc.size - offset)
        return self.client.get_blob_range(self.reference.repository, desc.digest, offset, length)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.client.head_blob(self.reference.repository, desc.digest) is not None

    def push_blob(self, desc: Descriptor, data: BlobData) -> None:
        self.client.push_blob(self.reference.repository, desc.digest, desc.size, data)

    def push_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        """PUT under `tag`, or under its digest when no tag is given."""
        ref = tag or _digest.of_bytes(data)
        desc = self.client.put_manifest(self.reference.repository, ref, data, media_type)
        self._manifests[desc.digest] = data
        if tag is not None and tag == self.tag:
            self._top = desc  # what the tag names from now on
        return desc


class _LayoutSourceBase(ImageSource):
    reader: _LayoutReader
    tag: str | None

    def resolve(self) -> Descriptor:
        return self.reader.resolve(self.tag)

    def has_blob(self, desc: Descriptor) -> bool:
        return self.reader.has_blob(desc.digest)

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        return _verify_manifest(self.reader.read_blob(desc.digest, desc.size), desc, self.ref)

    def open_blob(self, desc: Descriptor) -> Iterator[bytes]:
        return self.reader.open_blob(desc.digest, desc.size)

    def read_blob_range(self, desc: Descriptor, offset: int, length: int) -> bytes:
        if offset >= desc.size:
            return b""
        return self.reader.read_range(desc.digest, offset, min(length, desc.size - offset))


class LayoutSource(_LayoutSourceBase):
    writable = True

    def __init__(self, path: str, tag: str | None, create: bool = False) -> None:
        self.layout = OCILayout(path, create=create)
        self.reader = self.layout
        self.tag = tag
        self.ref = f"oci:{path}" + (f":{tag}" if tag else "")

    def push_blob(self, desc: Descriptor, data: BlobData) -> None:
        if self.layout.has_blob(desc.digest):
            return
        got = self.layout.write_blob(data, desc.digest)
        if got.size != desc.size:
            raise DigestError(
                f"{self.ref}: blob {desc.digest}: {got.size} bytes, descriptor says {desc.size}"
            )

    def push_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Descriptor:
        """Store the manifest blob and list it in index.json (tagged when `tag` is given)."""
        desc = Descriptor(media_type=media_type, digest=_digest.of_bytes(data), size=len(data))
        self.layout.write_blob(data, desc.digest)
        self.layout.add_manifest(desc, tag)
        return desc


class ArchiveSource(_LayoutSourceBase):
    def __init__(self, path: str, tag: str | None) -> None:
        self.reader = OCIArchive(path)
        self.tag = tag
        self.ref = f"oci-archive:{path}" + (f":{tag}" if tag else "")


def _split_path_tag(rest: str) -> tuple[str, str | None]:
    # Like skopeo: the first ':' ends the path, so paths cannot contain ':'.
    path, sep, tag = rest.partition(":")
    if not path:
        raise ReferenceError_("missing path in image source")
    return path, (tag or None) if sep else None


def open_source(spec: str, opts: SourceOptions | None = None, create: bool = False) -> ImageSource:
    """Open `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]` or a registry reference.

    `create=True` makes a missing `oci:` layout directory (for write targets).
    """
    opts = opts or SourceOptions()
    if spec.startswith("oci:"):
        path, tag = _split_path_tag(spec[len("oci:"):])
        return LayoutSource(path, tag, create=create)
    if spec.startswith("oci-archive:"):
        path, tag = _split_path_tag(spec[len("oci-archive:"):])
        return ArchiveSource(path, tag)
    ref = parse_reference(spec)
    creds = resolve_credentials(ref.registry, opts.user)
    ropts = RegistryOptions.from_config(
        opts.config or Config(), ref.registry, plain_http=opts.plain_http, skip_verify=opts.skip_verify,
        ca_file=os.fspath(opts.ca_file) if opts.ca_file else None, credentials=creds,
    )
    return RegistrySource(ref, get_client(ref.registry, ropts))


@dataclass
class ImageManifestInfo:
    descriptor: Descriptor
    manifest: ImageManifest
    platform: Platform | None
    raw: bytes = b""  # the manifest exactly as stored, for rewriting and keeping it
    config: bytes | None = None  # the config blob once read (verified), see read_config

    def platform_string(self) -> str:
        return str(self.platform) if self.platform is not None else ""


def read_config(source: ImageSource, image: ImageManifestInfo) -> bytes:
    """The image's config blob, verified against its digest; read from `source` only the first time (finding
    the platform of a single-manifest image reads it already)."""
    if image.config is None:
        image.config = source.read_blob(image.manifest.config)
    return image.config


def _config_platform(source: ImageSource, image: ImageManifestInfo) -> Platform | None:
    cfg = image.manifest.config
    if mt.base_type(cfg.media_type) not in (mt.OCI_CONFIG, mt.DOCKER_CONFIG) or cfg.size > (4 << 20):
        return None
    try:
        obj = json.loads(read_config(source, image))
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("os"), str) or not isinstance(
        obj.get("architecture"), str
    ):
        return None
    variant = obj.get("variant") if isinstance(obj.get("variant"), str) else ""
    return Platform(obj["os"], obj["architecture"], variant or "")


def _is_attestation(d: Descriptor) -> bool:
    # BuildKit stores provenance as pseudo-manifests with platform unknown/unknown.
    return "vnd.docker.reference.type" in d.annotations or (
        d.platform is not None and d.platform.os == "unknown"
    )


def _collect(source: ImageSource, desc: Descriptor, depth: int,
             out: list[tuple[Descriptor, Platform | None]]) -> None:
    if depth > 4:
        raise ManifestError(f"{source.ref}: image indexes nested too deeply")
    index = parse_index(source.fetch_manifest(desc), desc.media_type)
    for d in index.manifests:
        kind = mt.base_type(d.media_type)
        if kind in mt.INDEXES:
            _collect(source, d, depth + 1, out)
        elif kind in mt.IMAGE_MANIFESTS and not d.artifact_type and not _is_attestation(d):
            out.append((d, d.platform))


def select_manifests(source: ImageSource, platform: str | Platform | None = None,
                     all_platforms: bool = False) -> list[ImageManifestInfo]:
    """The image manifests to work on: the single manifest, or from an index the best platform match
    (the host's unless `platform` is given), or every platform with `all_platforms`.

    Raises NotFound, naming the available platforms, when nothing matches.
    """
    top = source.resolve()
    kind = mt.base_type(top.media_type)
    if kind in mt.IMAGE_MANIFESTS:
        data = source.fetch_manifest(top)
        info = ImageManifestInfo(top, parse_image_manifest(data, top.media_type), top.platform, data)
        if info.platform is None:
            info.platform = _config_platform(source, info)
        return [info]
    if kind not in mt.INDEXES:
        raise ManifestError(f"{source.ref}: unsupported top-level media type {top.media_type!r}")

    candidates: list[tuple[Descriptor, Platform | None]] = []
    _collect(source, top, 0, candidates)
    if not candidates:
        raise NotFound(f"{source.ref}: the image index lists no image manifests")

    if all_platforms:
        chosen = candidates
    else:
        if isinstance(platform, Platform):
            want = normalize(platform)
        elif platform:
            want = parse_platform(platform)
        else:
            want = host_platform()
        best: tuple[int, int] | None = None
        pick: tuple[Descriptor, Platform | None] | None = None
        for i, (d, p) in enumerate(candidates):
            rank = match_rank(want, p)
            if rank is not None and (best is None or (rank, i) < best):
                best, pick = (rank, i), (d, p)
        if pick is None:
            avail = ", ".join(sorted({str(p) for _, p in candidates if p is not None})) or "none declared"
            raise NotFound(f"{source.ref}: no image for platform {want} (available: {avail})")
        chosen = [pick]

    out: list[ImageManifestInfo] = []
    for d, p in chosen:
        data = source.fetch_manifest(d)
        man = parse_image_manifest(data, d.media_type)
        out.append(ImageManifestInfo(d, man, p, data))
    return out


def select_images(source: ImageSource, opts: SourceOptions) -> list[ImageManifestInfo]:
    """select_manifests for the platforms in `opts` (comma-separated), each manifest once."""
    if opts.all_platforms or not opts.platform:
        return select_manifests(source, opts.platform, opts.all_platforms)
    out: dict[str, ImageManifestInfo] = {}
    for p in opts.platform.split(","):
        for info in select_manifests(source, p.strip()):
            out.setdefault(info.descriptor.digest, info)
    return list(out.values())
