"""`soci image rpull`: pull an image into containerd through a snapshotter, so indexed layers can stay remote."""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc

from .. import digest as dg
from ..errors import DigestError, ReferenceError_, SociError
from ..oci import mediatype as mt
from ..oci.manifest import Descriptor, parse_index
from ..oci.source import ImageManifestInfo, RegistrySource, SourceOptions, open_source, read_config, select_manifests
from .client import Containerd, ContainerdError, descriptor_pb

log = logging.getLogger(__name__)

DEFAULT_SNAPSHOTTER = "soci"
LEASE_EXPIRY = 24 * 3600.0  # as containerd's own client leases: long enough for any pull, not forever

# Labels containerd's unpacker and its AppendInfoHandlerWrapper put on each Prepare (and Commit).
SNAPSHOT_REF_LABEL = "containerd.io/snapshot.ref"
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
# ...and those upstream SOCI's rpull adds.
SOCI_INDEX_DIGEST_LABEL = "containerd.io/snapshot/remote/soci.index.digest"
SOCI_SIZE_LABEL = "containerd.io/snapshot/remote/soci.size"
IMAGE_LAYERS_SIZE_LABEL = "containerd.io/snapshot/remote/image.layers.size"
# What the SOCI snapshotter puts on a snapshot it committed itself: "lazy" (mounted) or "local" (unpacked).
SOCI_MODE_LABEL = "containerd.io/snapshot/remote/soci.mode"
# Only these reach a proxy snapshotter; containerd drops other Prepare labels.
INHERITED_PREFIX = "containerd.io/snapshot/"

# Content labels.
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."
GC_CONTENT_PREFIX = "containerd.io/gc.ref.content."
GC_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."
# containerd refuses a label whose key and value together are longer.
MAX_LABEL_SIZE = 4096

STATE_LAZY = "lazy"
STATE_UNPACKED = "unpacked"
STATE_EXISTS = "exists"

_PREPARE_TRIES = 3
_CONFIG_MAX = 8 << 20

_CONFIG_TYPES = frozenset({mt.OCI_CONFIG, mt.DOCKER_CONFIG})
_DOCKER_LAYER_TYPES = frozenset({mt.DOCKER_LAYER, mt.DOCKER_LAYER_GZIP, mt.DOCKER_FOREIGN_LAYER,
                                 mt.DOCKER_FOREIGN_LAYER_GZIP})


class RpullError(SociError):
    """The image cannot be pulled as asked (bad config, mismatching diffIDs, nothing to pull)."""


# --- pure helpers (what containerd would compute) ---------------------------------------------------------------

def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI chainID of every prefix of the layer stack: ChainID(L0) = DiffID(L0),
    ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        dg.validate(d)
        out.append(d if not out else dg.of_bytes(f"{out[-1]} {d}".encode()))
    return out


def label_fits(key: str, value: str) -> bool:
    return len(key) + len(value) <= MAX_LABEL_SIZE


def capped_join(key: str, items: Sequence[str]) -> str:
    """As many of `items` as fit in label `key`, comma-joined, in order; the rest are dropped, as containerd
    does (the list only helps a snapshotter prefetch neighbours)."""
    value = ""
    for item in items:
        candidate = f"{value},{item}" if value else item
        if not label_fits(key, candidate):
            break
        value = candidate
    return value


def is_layer_type(media_type: str) -> bool:
    """containerd 1.6's idea of a layer (images.IsLayerType)."""
    if media_type.startswith("application/vnd.oci.image.layer."):
        return True
    return media_type.split("+", 1)[0] in _DOCKER_LAYER_TYPES


def child_gc_labels(children: Sequence[Descriptor]) -> dict[str, str]:
    """The `containerd.io/gc.ref.content.*` labels a parent blob gets for its children (images.ChildGCLabels
    with SetChildrenMappedLabels' numbering: a counter per key, suffixed when the key ends in '.' or repeats)."""
    counters: dict[str, int] = {}
    labels: dict[str, str] = {}
    for child in children:
        if child.media_type in _CONFIG_TYPES:
            key = GC_CONTENT_PREFIX + "config"
        elif child.media_type in (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST):
            key = GC_CONTENT_PREFIX + "m."
        elif is_layer_type(child.media_type):
            key = GC_CONTENT_PREFIX + "l."
        else:
            key = GC_CONTENT_PREFIX
        idx = counters.get(key, 0)
        counters[key] = idx + 1
        labels[f"{key}{idx}" if idx > 0 or key.endswith(".") else key] = child.digest
    return labels


def distribution_source(registry: str, repository: str, existing: str = "") -> tuple[str, str] | None:
    """(key, value) of the `containerd.io/distribution.source.<host>` label naming where a blob came from;
    `existing` repos are kept (sorted, unique). None when the label would be too long."""
    # containerd keys it by host name alone, without the port.
    host = urlsplit(f"dummy://{registry}").hostname or registry
    key = DISTRIBUTION_SOURCE_PREFIX + host
    repos = sorted({r for r in existing.split(",") if r} | {repository})
    value = ",".join(repos)
    return (key, value) if label_fits(key, value) else None


def layer_labels(image_ref: str, manifest_digest: str, layers: Sequence[Descriptor], i: int, chain_id: str,
                 index_digest: str | None = None) -> dict[str, str]:
    """The labels of layer i's Prepare and Commit, as containerd's unpacker with upstream SOCI's handler
    wrappers sends them."""
    layer = layers[i]
    labels = {k: v for k, v in layer.annotations.items() if k.startswith(INHERITED_PREFIX)}
    rest = [d for d in layers[i:] if is_layer_type(d.media_type)]
    digests = capped_join(IMAGE_LAYERS_LABEL, [d.digest for d in rest])
    count = len(digests.split(",")) if digests else 0
    labels.update({
        IMAGE_REF_LABEL: image_ref,
        LAYER_DIGEST_LABEL: layer.digest,
        IMAGE_LAYERS_LABEL: digests,
        MANIFEST_DIGEST_LABEL: manifest_digest,
        SOCI_SIZE_LABEL: str(layer.size),
        # As many sizes as digests, so a snapshotter can pair them up.
        IMAGE_LAYERS_SIZE_LABEL: capped_join(IMAGE_LAYERS_SIZE_LABEL, [str(d.size) for d in rest[:count]]),
    })
    if index_digest:
        labels[SOCI_INDEX_DIGEST_LABEL] = index_digest
    labels[SNAPSHOT_REF_LABEL] = chain_id
    return labels


def unique_key_part() -> str:
    """Like containerd's: nanoseconds and a few random bytes, enough to keep concurrent pulls apart."""
    return f"{time.time_ns() % 1_000_000_000}-{base64.urlsafe_b64encode(secrets.token_bytes(3)).decode()}"


# --- progress ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class LayerResult:
    index: int
    descriptor: Descriptor
    chain_id: str
    state: str  # STATE_LAZY, STATE_UNPACKED or STATE_EXISTS
    downloaded: int = 0
    seconds: float = 0.0
    detail: str = ""  # e.g. who unpacked it


@dataclass(slots=True)
class RpullResult:
    image: str  # the image record's name
    target: Descriptor  # what the record points at (an index or a manifest)
    manifest_digest: str
    platform: str
    chain_id: str  # the top layer's chainID, what `ctr run` prepares on
    layers: list[LayerResult] = field(default_factory=list)
    downloaded: int = 0  # bytes read from the registry
    seconds: float = 0.0
    created: bool = True  # False when an existing image record was updated

    def count(self, state: str) -> int:
        return sum(1 for r in self.layers if r.state == state)


class RpullEvents(Protocol):
    def layer_started(self, index: int, total: int, layer: Descriptor) -> None: ...

    def download_progress(self, index: int, layer: Descriptor, done: int) -> None: ...

    def layer_done(self, result: LayerResult, total: int) -> None: ...


class NoEvents:
    def layer_started(self, index: int, total: int, layer: Descriptor) -> None:
        pass

    def download_progress(self, index: int, layer: Descriptor, done: int) -> None:
        pass

    def layer_done(self, result: LayerResult, total: int) -> None:
        pass


@dataclass(frozen=True, slots=True)
class RpullOptions:
    snapshotter: str = DEFAULT_SNAPSHOTTER
    index_digest: str | None = None  # passed to the snapshotter; discovery happens there when unset
    platform: str | None = None  # "os/arch[/variant]"; the host's by default
    image_labels: Mapping[str, str] = field(default_factory=dict)
    lease_expiry: float = LEASE_EXPIRY


# --- the pull ---------------------------------------------------------------------------------------------------

def _index_path(source: RegistrySource, top: Descriptor, want: str, depth: int = 0) -> list[tuple[Descriptor, bytes]]:
    """The image indexes from `top` down to the one listing manifest `want` (empty when `top` is it)."""
    if top.digest == want or depth > 4 or mt.base_type(top.media_type) not in mt.INDEXES:
        return []
    data = source.fetch_manifest(top)
    for child in parse_index(data, top.media_type).manifests:
        if child.digest == want:
            return [(top, data)]
        if mt.base_type(child.media_type) in mt.INDEXES:
            below = _index_path(source, child, want, depth + 1)
            if below:
                return [(top, data), *below]
    return []


def _diff_ids(config: bytes, n_layers: int, where: str) -> list[str]:
    try:
        doc = json.loads(config)
        diff_ids = doc["rootfs"]["diff_ids"]
    except (ValueError, TypeError, KeyError):
        raise RpullError(f"{where}: image config has no rootfs.diff_ids") from None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise RpullError(f"{where}: image config's rootfs.diff_ids is not a list of digests")
    if len(diff_ids) != n_layers:
        raise RpullError(f"{where}: {n_layers} layers but {len(diff_ids)} diff_ids in the image config")
    try:
        return [dg.validate(d) for d in diff_ids]
    except DigestError as exc:
        raise RpullError(f"{where}: image config: {exc}") from None


class _Puller:
    def __init__(self, cd: Containerd, source: RegistrySource, opts: RpullOptions, events: RpullEvents) -> None:
        self.cd, self.source, self.opts, self.events = cd, source, opts, events
        self.sn = opts.snapshotter
        self.downloaded = 0

    def _dist_label(self, digest: str, existing: Mapping[str, str] | None) -> dict[str, str]:
        ref = self.source.reference
        host = urlsplit(f"dummy://{ref.registry}").hostname or ref.registry
        have = (existing or {}).get(DISTRIBUTION_SOURCE_PREFIX + host, "")
        kv = distribution_source(ref.registry, ref.repository, have)
        return dict([kv]) if kv else {}

    def put_blob(self, desc: Descriptor, data: bytes, labels: Mapping[str, str]) -> None:
        """A small blob (manifest, index, config) into the content store with its labels."""
        existing = self.cd.content_labels(desc.digest)
        all_labels = {**labels, **self._dist_label(desc.digest, existing)}
        if existing is not None:
            self.cd.update_content_labels(desc.digest, all_labels)
            return
        self.cd.write_content(_ref_key(desc), desc.digest, desc.size, [data], all_labels)

    def fetch_layer(self, i: int, layer: Descriptor) -> int:
        """Stream a layer blob from the registry into the content store (verified by both ends); bytes read."""
        existing = self.cd.content_labels(layer.digest)
        labels = self._dist_label(layer.digest, existing)
        if existing is not None:
            self.cd.update_content_labels(layer.digest, labels)
            return 0
        got = 0

        def chunks() -> Iterator[bytes]:
            nonlocal got
            for chunk in self.source.open_blob(layer):
                got += len(chunk)
                self.events.download_progress(i, layer, got)
                yield chunk

        self.cd.write_content(_ref_key(layer), layer.digest, layer.size, chunks(), labels)
        log.info("fetched layer %s (%d bytes)", layer.digest, got)
        return got

    def unpack_layer(self, i: int, layers: Sequence[Descriptor], diff_ids: Sequence[str], chain: Sequence[str],
                     manifest_digest: str) -> LayerResult:
        layer, chain_id = layers[i], chain[i]
        parent = chain[i - 1] if i else ""
        start = time.monotonic()

        def result(state: str, downloaded: int = 0, detail: str = "") -> LayerResult:
            return LayerResult(i, layer, chain_id, state, downloaded, time.monotonic() - start, detail)

        if self.cd.stat_snapshot(self.sn, chain_id) is not None:
            log.info("layer %s: snapshot %s exists", layer.digest, chain_id)
            return result(STATE_EXISTS)
        labels = layer_labels(str(self.source.reference), manifest_digest, layers, i, chain_id,
                              self.opts.index_digest)
        mounts: list[Any] | None = None
        key = ""
        for _ in range(_PREPARE_TRIES):
            key = f"extract-{unique_key_part()} {chain_id}"
            try:
                mounts = self.cd.prepare_snapshot(self.sn, key, parent, labels)
                break
            except ContainerdError as exc:
                if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            # The snapshotter took the layer and committed it as the chainID: mounted lazily, or (for the
            # layers of an indexed image that have no zTOC) fetched and unpacked by the snapshotter itself.
            info = self.cd.stat_snapshot(self.sn, chain_id)
            if info is not None:
                mode = info.labels.get(SOCI_MODE_LABEL, "")
                log.info("layer %s: remote snapshot %s (%s)", layer.digest, chain_id, mode or "lazy")
                if mode == "local":
                    return result(STATE_UNPACKED, detail="by the snapshotter")
                return result(STATE_LAZY)
            log.debug("prepare %s: exists, yet no snapshot %s; trying a new key", key, chain_id)
        if mounts is None:
            raise ContainerdError(f"snapshotter {self.sn}: prepare of layer {layer.digest} keeps answering "
                                  f"'already exists' but snapshot {chain_id} is not there")
        committed = False
        try:
            got = self.fetch_layer(i, layer)
            self.downloaded += got
            diff_id = self.cd.apply_layer(layer.media_type, layer.digest, layer.size, mounts)
            if diff_id != diff_ids[i]:
                raise RpullError(f"layer {layer.digest}: unpacked content is {diff_id}, the image config says "
                                 f"{diff_ids[i]}")
            try:
                self.cd.commit_snapshot(self.sn, chain_id, key, labels)
                committed = True
            except ContainerdError as exc:
                if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                # Another pull committed the same chainID meanwhile: theirs is as good as ours.
                log.info("layer %s: snapshot %s committed by someone else meanwhile", layer.digest, chain_id)
                return result(STATE_EXISTS, got)
        finally:
            if not committed:
                with suppress(SociError):
                    self.cd.remove_snapshot(self.sn, key)
        # Recorded only now that Apply has verified it, as containerd does.
        self.cd.update_content_labels(layer.digest, {UNCOMPRESSED_LABEL: diff_id})
        log.info("layer %s: unpacked into %s", layer.digest, chain_id)
        return result(STATE_UNPACKED, got)


@dataclass(slots=True)
class _Plan:
    top: Descriptor  # what the reference names: an index or a manifest
    indexes: list[tuple[Descriptor, bytes]]  # from the top down to the index listing the chosen manifest
    image: ImageManifestInfo
    config: bytes
    diff_ids: list[str]
    chain: list[str]
    fetched: int  # bytes read from the registry for all of the above


def _resolve(source: RegistrySource, platform: str | None) -> _Plan:
    """Everything the pull needs from the registry before writing anything: manifests, config, chainIDs."""
    name = str(source.reference)
    top = source.resolve()  # the source keeps it: selecting the platform image below asks no second time
    image = select_manifests(source, platform)[0]
    manifest = image.manifest
    config = read_config(source, image) if manifest.config.size <= _CONFIG_MAX else b""
    if not config:
        raise RpullError(f"{name}: image config {manifest.config.digest} is missing or too large")
    diff_ids = _diff_ids(config, len(manifest.layers), name)
    if not manifest.layers:
        raise RpullError(f"{name}: the image has no layers")
    indexes = _index_path(source, top, image.descriptor.digest)
    fetched = sum(len(d) for _, d in indexes) + len(image.raw) + len(config)
    return _Plan(top, indexes, image, config, diff_ids, chain_ids(diff_ids), fetched)


def _ref_key(desc: Descriptor) -> str:
    """The ingest ref containerd's fetcher uses, so a concurrent `ctr pull` of the same blob waits for us."""
    base = mt.base_type(desc.media_type)
    kind = ("manifest" if base in mt.IMAGE_MANIFESTS else "index" if base in mt.INDEXES
            else "config" if base in _CONFIG_TYPES else "layer")
    return f"{kind}-{desc.digest}"


def rpull(address: str, namespace: str, image_ref: str, source_opts: SourceOptions | None = None,
          opts: RpullOptions | None = None, events: RpullEvents | None = None) -> RpullResult:
    """Pull `image_ref` into containerd at `address` (namespace `namespace`), unpacking through
    `opts.snapshotter` so that a remote snapshotter may mount layers lazily instead.

    Afterwards the image record `image_ref` (normalised) exists and `ctr run --snapshotter SN IMAGE` works.
    Everything is written under a lease that is released at the end; the image record and the GC labels
    (index -> manifests -> config and layers; config -> top snapshot) hold it from then on.
    """
    opts = opts or RpullOptions()
    events = events or NoEvents()
    started = time.monotonic()
    if image_ref.startswith(("oci:", "oci-archive:")):
        raise ReferenceError_(f"{image_ref}: rpull needs a registry reference (host/repo:tag or @digest)")
    if opts.index_digest:
        try:
            dg.validate(opts.index_digest)
        except DigestError as exc:
            raise RpullError(f"--soci-index-digest: {exc}") from None
    source = open_source(image_ref, source_opts or SourceOptions())
    if not isinstance(source, RegistrySource):
        raise ReferenceError_(f"{image_ref}: rpull needs a registry reference (host/repo:tag or @digest)")
    name = str(source.reference)
    # containerd first (connecting writes nothing), then the registry: both report before anything is written.
    with Containerd(address, namespace) as cd:
        plan = _resolve(source, opts.platform)
        manifest, layers, chain, image = plan.image.manifest, plan.image.manifest.layers, plan.chain, plan.image
        result = RpullResult(name, plan.top, image.descriptor.digest, image.platform_string(), chain[-1])
        lease = cd.create_lease(f"soci-rpull-{uuid.uuid4().hex[:12]}", opts.lease_expiry)
        log.info("pulling %s (manifest %s) into snapshotter %s under lease %s", name, image.descriptor.digest,
                 opts.snapshotter, lease)
        puller = _Puller(cd, source, opts, events)
        failed = True
        try:
            puller.put_blob(manifest.config, plan.config, {})
            puller.put_blob(image.descriptor, image.raw, child_gc_labels([manifest.config, *layers]))
            for desc, data in reversed(plan.indexes):
                puller.put_blob(desc, data, child_gc_labels(parse_index(data, desc.media_type).manifests))
            for i, layer in enumerate(layers):
                events.layer_started(i, len(layers), layer)
                res = puller.unpack_layer(i, layers, plan.diff_ids, chain, image.descriptor.digest)
                result.layers.append(res)
                events.layer_done(res, len(layers))
            # What keeps the snapshots once the lease is gone (containerd's unpacker sets the same).
            cd.update_content_labels(manifest.config.digest, {GC_SNAPSHOT_PREFIX + opts.snapshotter: chain[-1]})
            target = descriptor_pb(plan.top.media_type, plan.top.digest, plan.top.size)
            result.created = cd.put_image(name, target, dict(opts.image_labels))
            failed = False
        finally:
            try:
                cd.delete_lease()
            except SociError as exc:
                if not failed:
                    raise
                log.warning("releasing lease %s after a failed pull: %s", lease, exc)
    result.downloaded = plan.fetched + puller.downloaded
    result.seconds = time.monotonic() - started
    log.info("pulled %s: %d lazy, %d unpacked, %d existing layers, %d bytes in %.2fs", name,
             result.count(STATE_LAZY), result.count(STATE_UNPACKED), result.count(STATE_EXISTS), result.downloaded,
             result.seconds)
    return result


__all__ = [
    "IMAGE_LAYERS_LABEL", "IMAGE_LAYERS_SIZE_LABEL", "IMAGE_REF_LABEL", "LAYER_DIGEST_LABEL",
    "MANIFEST_DIGEST_LABEL", "SNAPSHOT_REF_LABEL", "SOCI_INDEX_DIGEST_LABEL", "SOCI_SIZE_LABEL",
    "LayerResult", "NoEvents", "RpullError", "RpullEvents", "RpullOptions", "RpullResult", "chain_ids",
    "child_gc_labels", "distribution_source", "layer_labels", "rpull",
]
