"""The SOCI decider: at Prepare, mount indexed layers lazily, unpack the rest of an indexed image locally."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .. import config as config_mod
from .. import digest as dg
from ..config import Config
from ..errors import NotFound, SociError
from ..fs import server as srv
from ..index import soci_index as si
from ..index.discover import discover
from ..index.ops import Store
from ..mount.helper import force_unmount, mount_layer, soci_mounts_at
from ..mount.hints import HintListener
from ..mount.spares import SparePool
from ..oci import mediatype as mt
from ..oci.auth import resolve_credentials
from ..oci.manifest import Descriptor
from ..oci.mirrors import insecure_host
from ..oci.reference import Reference, parse_reference
from ..oci.registry import RegistryClient, RegistryOptions, get_client
from ..oci.source import ImageManifestInfo, SourceOptions, open_source, read_config, select_manifests
from ..store.artifacts import TYPE_INDEX
from ..store.atomic import write_atomically
from .metadata import SnapshotInvalid, SnapshotPrecondition, Usage
from .remote import LayerRequest, RemoteLayer, lazy_unmount
from .unpack import unpack_blob

if TYPE_CHECKING:
    from .service import Snapshotter

log = logging.getLogger(__name__)

# Labels a lazy pull (`soci image rpull`, or CRI) puts on Prepare; containerd passes `containerd.io/snapshot/*`.
IMAGE_REF_LABEL = "containerd.io/snapshot/cri.image-ref"
LAYER_DIGEST_LABEL = "containerd.io/snapshot/cri.layer-digest"
MANIFEST_DIGEST_LABEL = "containerd.io/snapshot/cri.manifest-digest"
IMAGE_LAYERS_LABEL = "containerd.io/snapshot/cri.image-layers"
INDEX_DIGEST_LABEL = "containerd.io/snapshot/remote/soci.index.digest"
# Put on the committed snapshot: how its content got there.
REMOTE_LABEL = "containerd.io/snapshot/remote"
MODE_LABEL = "containerd.io/snapshot/remote/soci.mode"
ZTOC_LABEL = "containerd.io/snapshot/remote/soci.ztoc.digest"

# Negative discovery results expire: an index may be pushed after a first pull found none.
NO_INDEX_TTL = 60.0
# Images (and their index lookups) remembered between Prepares: an image's layers arrive one Prepare each, and
# a daemon runs for months.
IMAGE_CACHE_SIZE = 64
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS remote_mounts (
    snapshot_id INTEGER PRIMARY KEY,
    mountpoint TEXT NOT NULL,
    source TEXT NOT NULL,
    options TEXT NOT NULL,
    layer_digest TEXT NOT NULL,
    ztoc_digest TEXT NOT NULL,
    created_ns INTEGER NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class MountRecord:
    """What a lazy snapshot mounted: enough to mount it again after its layer server died or a reboot."""

    snapshot_id: int
    mountpoint: str
    source: str
    options: str
    layer_digest: str
    ztoc_digest: str


class MountTable:
    """A side table in the snapshot database; containerd may rewrite a snapshot's labels, never this."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, r: MountRecord) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO remote_mounts VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (r.snapshot_id, r.mountpoint, r.source, r.options, r.layer_digest, r.ztoc_digest,
                              time.time_ns()))

    def delete(self, mountpoint: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM remote_mounts WHERE mountpoint = ?", (mountpoint,))

    def all(self) -> list[MountRecord]:
        with self._lock:
            rows = self._db.execute("SELECT snapshot_id, mountpoint, source, options, layer_digest, ztoc_digest "
                                    "FROM remote_mounts ORDER BY snapshot_id").fetchall()
        return [MountRecord(int(r[0]), *(str(x) for x in r[1:])) for r in rows]


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """One platform image as the registry describes it: layers in order, their diffIDs and chainIDs."""

    reference: Reference  # pinned to the manifest digest
    manifest_digest: str
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    chain_ids: tuple[str, ...]

    def position(self, layer_digest: str) -> int:
        for i, d in enumerate(self.layers):
            if d.digest == layer_digest:
                return i
        raise SnapshotInvalid(f"layer {layer_digest} is not a layer of image manifest {self.manifest_digest}")


@dataclass(frozen=True, slots=True)
class FoundIndex:
    digest: str
    index: si.SociIndex


def chain_ids(diff_ids: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else dg.of_bytes(f"{out[-1]} {d}".encode()))
    return tuple(out)


def _label_digest(labels: Mapping[str, str], key: str) -> str | None:
    value = labels.get(key)
    if value is None or value == "":
        return None
    if not _is_digest(value):
        raise SnapshotInvalid(f"label {key}: {value[:80]!r} is not a sha256 digest")
    return value


def _is_digest(value: object) -> bool:
    try:
        dg.validate(value)  # type: ignore[arg-type]
    except SociError:
        return False
    return True


_K = TypeVar("_K")
_V = TypeVar("_V")


def _remember(cache: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """Store `key` as the most recently used entry; the least recently used ones beyond `limit` go."""
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > limit:
        del cache[next(iter(cache))]


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    return name in _LOOPBACK or name.startswith("127.")


class SociDecider:
    """Prepare with a layer's image labels: a layer with a zTOC (and at least [snapshotter] min_layer_size) is
    mounted lazily by a detached layer server; the image's other layers are downloaded, checked against their
    diffIDs and unpacked here; an image with no SOCI index (or one the [pull_modes] disable) is left to
    containerd."""

    def __init__(self, root: str | os.PathLike[str], config: Config | None = None,
                 config_path: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.config = config or Config()
        sroot = self.root / "snapshotter"
        sroot.mkdir(parents=True, exist_ok=True)
        if config_path is None:
            # Layer servers read their own config file; give them exactly the daemon's settings.
            config_path = str(sroot / "layer-server.toml")
            write_atomically(config_path, config_mod.to_toml(self.config))
        self.config_path = config_path
        self.table = MountTable(sroot / "metadata.db")
        self._lock = threading.Lock()
        # Per-image locks with their holder counts; an entry goes when its last holder leaves (a daemon sees
        # many images over its life).
        self._key_locks: dict[str, tuple[threading.Lock, list[int]]] = {}
        self._images: dict[str, ImageInfo] = {}
        self._indexes: dict[tuple[str, str], tuple[FoundIndex | None, float]] = {}
        # A layer server takes 0.15 to 0.3 s (more while a client competes for the cores) to start its interpreter
        # and imports; a spare started when a pull begins does that while the index is discovered and the
        # previous layer mounts.
        self.spares = SparePool(self.root)
        # `soci image rpull` names its image as it starts: the spare's start and the index's discovery then
        # overlap the client's own start.
        self.hints = HintListener(self.root, self._on_pull_hint)
        self.hints.start()

    def close(self) -> None:
        self.hints.close()
        self.spares.close()
        self.table.close()

    # --- helpers ------------------------------------------------------------------

    def _lazy_modes_on(self) -> bool:
        modes = self.config.pull_modes
        return modes.soci_v1.enable or modes.soci_v2.enable

    def _on_pull_hint(self, hints: list[str]) -> None:
        if not self._lazy_modes_on():
            return
        log.debug("pull hint (%s): starting a spare layer server", ", ".join(hints) or "no image named")
        self.spares.warm()
        for hint in hints:
            threading.Thread(target=self._look_up_ahead, args=(hint,), name="pull-hint", daemon=True).start()

    def _look_up_ahead(self, hint: str) -> None:
        """Resolve a hinted image and discover its index (zTOCs into the store) before its first Prepare, which
        then finds both remembered; and start a spare for each of its lazy layers. Failures are the Prepare's to
        report: here they are only logged."""
        image, _, index_digest = hint.partition(" ")
        try:
            ref = parse_reference(image)
            explicit = index_digest if _is_digest(index_digest) else None
            with self._once(ref.name):
                info, fetched = self._image(ref, None)
                found = self._index(info, explicit, fetched)
        except Exception as exc:  # noqa: BLE001 - advisory: the Prepare looks again and reports
            log.info("pull hint %s: not looked up ahead: %s", image, exc)
            return
        lazy = self._lazy_layers(info, found)
        log.info("pull hint %s: manifest %s, %d lazy layer(s), looked up ahead", image, info.manifest_digest, lazy)
        if lazy:
            self.spares.warm(lazy)
        else:
            self.spares.drop()  # as its Prepare would: no mount of this image is coming

    @contextmanager
    def _once(self, key: str) -> Iterator[None]:
        """Serialise work on one image: concurrent Prepares of its layers discover its index once."""
        with self._lock:
            lock, users = self._key_locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users[0] -= 1
                if not users[0]:
                    del self._key_locks[key]

    def _plain_http(self, host: str) -> bool:
        # Like containerd's resolver: loopback registries speak plain HTTP, and so does a host that config.toml
        # lists as its own insecure mirror ([[resolver.host."H".mirrors]] host = "H", insecure = true).
        return is_loopback(host) or insecure_host(self.config, host)

    def _client(self, ref: Reference) -> RegistryClient:
        creds = resolve_credentials(ref.registry)
        return get_client(ref.api_host, RegistryOptions.from_config(
            self.config, ref.registry, plain_http=self._plain_http(ref.registry), credentials=creds))

    def _source_opts(self, ref: Reference) -> SourceOptions:
        return SourceOptions(plain_http=self._plain_http(ref.registry), config=self.config)

    # --- image and index ------------------------------------------------------------

    def _image(self, ref: Reference, manifest_digest: str | None) -> tuple[ImageInfo, ImageManifestInfo | None]:
        """The image a Prepare's labels name; with it, when it was fetched just now rather than remembered, the
        manifest (and config) as read, so that index discovery does not fetch them again."""
        # Keyed by repository too: the same manifest pushed elsewhere must be fetched from there.
        key = f"{ref.name}@{manifest_digest}" if manifest_digest else str(ref)
        with self._lock:
            cached = self._images.get(key)
            if cached is not None:
                _remember(self._images, key, cached, IMAGE_CACHE_SIZE)
                return cached, None
        target = Reference(ref.registry, ref.repository, None, manifest_digest) if manifest_digest else ref
        source = open_source(str(target), self._source_opts(ref))
        # By digest the registry client checks the bytes against it; by tag the host's platform is chosen.
        image = select_manifests(source)[0]
        digest = image.descriptor.digest
        if manifest_digest is not None and digest != manifest_digest:
            raise SnapshotPrecondition(f"registry {ref.registry}: {manifest_digest} is an image index, "
                                       f"not an image manifest")
        cfg = json.loads(read_config(source, image))
        diff_ids = tuple((cfg.get("rootfs") or {}).get("diff_ids") or ())
        layers = image.manifest.layers
        if len(diff_ids) != len(layers) or not all(isinstance(d, str) and _is_digest(d) for d in diff_ids):
            raise SnapshotPrecondition(f"image {digest}: config lists {len(diff_ids)} diffIDs for "
                                       f"{len(layers)} layers")
        pinned = Reference(ref.registry, ref.repository, None, digest)
        info = ImageInfo(pinned, digest, tuple(layers), diff_ids, chain_ids(diff_ids))
        with self._lock:
            _remember(self._images, key, info, IMAGE_CACHE_SIZE)
            _remember(self._images, f"{ref.name}@{digest}", info, IMAGE_CACHE_SIZE)
        return info, image

    def _mode_enabled(self, artifact_type: str) -> bool:
        if artifact_type == si.ARTIFACT_TYPE_V2:
            return self.config.pull_modes.soci_v2.enable
        return self.config.pull_modes.soci_v1.enable

    def _local_index(self, store: Store, info: ImageInfo, explicit: str | None) -> FoundIndex | None:
        """An index already in the local store (from `soci create`, `index pull` or an earlier discovery)."""
        if explicit:
            candidates = [explicit] if store.content.has(explicit) else []
        else:
            entries = [e for e in store.db.indexes(info.manifest_digest) if e.type == TYPE_INDEX]
            entries += [e for e in store.db.indexes() if e.image_digest == info.manifest_digest
                        and e not in entries]
            candidates = [e.digest for e in sorted(entries, key=lambda e: e.created_at, reverse=True)]
        for digest in candidates:
            if not store.content.has(digest):
                continue
            index = store.load_index(digest)
            if not self._mode_enabled(index.artifact_type):
                log.info("index %s of %s skipped: its pull mode is disabled", digest, info.manifest_digest)
                continue
            if all(store.content.has(z.digest) for z in index.ztocs):
                return FoundIndex(digest, index)
        return None

    def _index(self, info: ImageInfo, explicit: str | None, image: ImageManifestInfo | None = None
               ) -> FoundIndex | None:
        """The SOCI index to use for `info`; `image` is its manifest when the caller has just fetched it."""
        key = (info.manifest_digest, explicit or "")
        with self._lock:
            hit = self._indexes.get(key)
        if hit is not None and (hit[0] is not None or time.monotonic() < hit[1]):
            return hit[0]
        store = Store.open(str(self.root))
        try:
            found = self._local_index(store, info, explicit)
            if found is None:
                if not self._lazy_modes_on() and not explicit:
                    log.info("image %s: both SOCI pull modes are disabled", info.manifest_digest)
                    return None
                try:
                    # Each layer server checks its zTOC's entries as it builds its table; here, the header.
                    d = discover(str(info.reference), self._source_opts(info.reference), store,
                                 explicit_index_digest=explicit, image=image, check_entries=False)
                except NotFound as exc:
                    if explicit:
                        raise SnapshotPrecondition(f"SOCI index {explicit} named by the label: {exc}") from None
                    log.info("image %s has no SOCI index; layers are unpacked by containerd", info.manifest_digest)
                    with self._lock:
                        _remember(self._indexes, key, (None, time.monotonic() + NO_INDEX_TTL), IMAGE_CACHE_SIZE)
                    return None
                if self._mode_enabled(d.index.artifact_type):
                    found = FoundIndex(d.digest, d.index)
                else:
                    log.info("image %s: index %s found via %s, but its pull mode is disabled",
                             info.manifest_digest, d.digest, d.found_via)
        finally:
            store.close()
        with self._lock:
            _remember(self._indexes, key, (found, time.monotonic() + NO_INDEX_TTL), IMAGE_CACHE_SIZE)
        return found

    def _lazy(self, desc: Descriptor, found: FoundIndex) -> si.ZtocRef | None:
        """The zTOC to mount this layer with, None if it is unpacked here instead."""
        z = found.index.ztoc_for_layer(desc.digest)
        return z if z is not None and desc.size >= self.config.snapshotter.min_layer_size else None

    def _lazy_layers(self, info: ImageInfo, found: FoundIndex | None, first: int = 0) -> int:
        """How many of the image's layers from position `first` on are mounted lazily."""
        if found is None:
            return 0
        return sum(1 for d in info.layers[first:] if self._lazy(d, found) is not None)

    def _may_mount(self, ref: Reference, layer: str, manifest_digest: str | None, explicit: str | None) -> bool:
        """Whether a lazy mount of this layer or a later one of its image may follow: False once the image is
        known to have no index, or this and its later layers are all unpacked here."""
        if not (self._lazy_modes_on() or explicit):
            return False
        if manifest_digest is None:
            return True
        with self._lock:
            hit = self._indexes.get((manifest_digest, explicit or ""))
            info = self._images.get(f"{ref.name}@{manifest_digest}")
        if hit is None or info is None:
            return True  # the image's first Prepare: nothing known yet
        pos = next((i for i, d in enumerate(info.layers) if d.digest == layer), 0)
        return self._lazy_layers(info, hit[0], pos) > 0

    # --- the hook -----------------------------------------------------------------------

    def prepare(self, req: LayerRequest) -> RemoteLayer | None:
        labels = req.labels
        layer = _label_digest(labels, LAYER_DIGEST_LABEL)
        image_ref = labels.get(IMAGE_REF_LABEL, "")
        if layer is None and not image_ref:
            return None  # containerd's own unpacker: no image labels, nothing to decide
        if layer is None or not image_ref:
            raise SnapshotInvalid(f"labels {IMAGE_REF_LABEL} and {LAYER_DIGEST_LABEL} must be given together")
        try:
            ref = parse_reference(image_ref)
        except SociError as exc:
            raise SnapshotInvalid(f"label {IMAGE_REF_LABEL}: {exc}") from None
        manifest_digest = _label_digest(labels, MANIFEST_DIGEST_LABEL)
        explicit = _label_digest(labels, INDEX_DIGEST_LABEL)
        for d in filter(None, labels.get(IMAGE_LAYERS_LABEL, "").split(",")):
            if not _is_digest(d.strip()):
                raise SnapshotInvalid(f"label {IMAGE_LAYERS_LABEL}: {d[:80]!r} is not a sha256 digest")
        if self._may_mount(ref, layer, manifest_digest, explicit):
            self.spares.warm()  # a lazy mount may follow: the spare starts while the index is looked up
        try:
            with self._once(ref.name):
                info, fetched = self._image(ref, manifest_digest)
                found = self._index(info, explicit, fetched)
            return self._decide(req, layer, info, found)
        except BaseException:
            self.spares.drop()  # a failed Prepare leaves nothing running behind it
            raise

    def _decide(self, req: LayerRequest, layer: str, info: ImageInfo,
                found: FoundIndex | None) -> RemoteLayer | None:
        """Mount the layer, unpack it here, or (no index) leave it to containerd; the spare goes when no lazy
        mount of this image is left to come."""
        if found is None:
            self.spares.drop()
            return None
        pos = info.position(layer)
        if info.chain_ids[pos] != req.target:
            raise SnapshotInvalid(f"layer {layer} is at chainID {info.chain_ids[pos]} in image "
                                  f"{info.manifest_digest}, but Prepare targets {req.target}")
        desc = info.layers[pos]
        z = self._lazy(desc, found)
        more = self._lazy_layers(info, found, pos + 1) > 0
        if z is not None:
            p = found.index.prefetch_for_layer(desc.digest)
            return self._mount(req, info, desc, z, more, p.digest if p is not None else "")
        if not more:
            self.spares.drop()
        min_size = self.config.snapshotter.min_layer_size
        why = "no zTOC" if found.index.ztoc_for_layer(layer) is None else f"smaller than min_layer_size {min_size}"
        return self._unpack(req, info, pos, why)

    def _mount(self, req: LayerRequest, info: ImageInfo, desc: Descriptor, z: si.ZtocRef,
               more: bool = False, prefetch: str = "") -> RemoteLayer:
        """Mount the layer lazily; `more`: later layers of the image will be mounted too; `prefetch`: the
        index's prefetch artifact for the layer (one discovery could not fetch is the server's to skip)."""
        ref = info.reference
        source = f"{ref.registry}/{ref.repository}@{desc.digest}"
        opts = ["ro", f"ztoc={z.digest}", f"root={self.root}", f"config={self.config_path}"]
        if self._plain_http(ref.registry):
            opts.append("plain_http")
        if prefetch:
            opts.append(f"prefetch={prefetch}")
        options = ",".join(opts)
        mountpoint = str(req.mountpoint)
        res = mount_layer(source, mountpoint, options, root=str(self.root), spare=self.spares.take(more))
        try:
            self.table.put(MountRecord(int(req.mountpoint.parent.name), mountpoint, source, options, desc.digest,
                                       z.digest))
        except BaseException:
            self.release(req.mountpoint)
            raise
        log.info("layer %s mounted lazily at %s (zTOC %s, server %s)", desc.digest, mountpoint, z.digest, res.pid)
        return RemoteLayer(labels={REMOTE_LABEL: "soci", MODE_LABEL: "lazy", ZTOC_LABEL: z.digest},
                           usage=Usage(0, 0))

    def _unpack(self, req: LayerRequest, info: ImageInfo, pos: int, why: str) -> RemoteLayer:
        from .service import disk_usage  # the service imports this module; its helper is needed only here

        desc = info.layers[pos]
        comp = mt.layer_compression(desc.media_type)
        compression = {mt.Compression.GZIP: "gzip", mt.Compression.ZSTD: "zstd",
                       mt.Compression.UNCOMPRESSED: "none"}.get(comp)
        store = Store.open(str(self.root))
        blob = req.mountpoint.parent / "layer.download"
        started = time.monotonic()
        try:
            if store.content.has(desc.digest):
                path = store.content.path(desc.digest)
            else:
                client = self._client(info.reference)
                # The client verifies size and digest after the last chunk; a mismatch raises before unpacking.
                with open(blob, "wb") as f:
                    for chunk in client.open_blob(info.reference.repository, desc.digest, desc.size):
                        f.write(chunk)
                path = blob
            stats = unpack_blob(path, req.mountpoint, compression=compression,
                                expected_diff_id=info.diff_ids[pos])
        finally:
            store.close()
            blob.unlink(missing_ok=True)
        usage = disk_usage(req.mountpoint)
        log.info("layer %s (%s) unpacked locally: %d entries, %d bytes in %.2f s", desc.digest, why, stats.entries,
                 desc.size, time.monotonic() - started)
        return RemoteLayer(labels={REMOTE_LABEL: "soci", MODE_LABEL: "local"}, usage=usage)

    # --- unmounting -------------------------------------------------------------------

    def _servers_at(self, mountpoint: str) -> list[tuple[Path, dict[str, object]]]:
        mdir = srv.mounts_dir(self.root)
        out = []
        for path in sorted(mdir.glob("*.json")) if mdir.is_dir() else []:
            doc = srv.read_state(path)
            if doc is not None and doc.get("mountpoint") == mountpoint:
                out.append((path, doc))
        return out

    def _end_servers(self, servers: list[tuple[Path, dict[str, object]]], grace: float = 3.0) -> None:
        deadline = time.monotonic() + grace
        for path, doc in servers:
            pid, mid = doc.get("pid"), str(doc.get("id") or path.stem)
            if isinstance(pid, int):
                # An unmounted server exits by itself; only one that hangs on is ended.
                while srv.is_server_process(pid, mid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    if not srv.is_server_process(pid, mid):
                        break
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        break
                    time.sleep(0.2)
            path.unlink(missing_ok=True)
            srv.log_path(self.root, mid).unlink(missing_ok=True)

    def release(self, mountpoint: Path) -> None:
        mp = str(mountpoint)
        servers = self._servers_at(mp)
        if soci_mounts_at(mp):
            subprocess.run(["fusermount3", "-u", mp], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=20, check=False)
            if soci_mounts_at(mp) and not force_unmount(mp):
                log.error("cannot unmount %s", mp)
        lazy_unmount(mountpoint)
        self._end_servers(servers)
        self.table.delete(mp)
        if servers:
            log.info("released %s (%d layer server(s))", mp, len(servers))

    # --- restarts -------------------------------------------------------------------------

    def _alive(self, mountpoint: str, servers: list[tuple[Path, dict[str, object]]]) -> bool:
        if not soci_mounts_at(mountpoint):
            return False
        up = any(isinstance(d.get("pid"), int) and srv.is_server_process(int(d["pid"]),  # type: ignore[call-overload]
                                                                         str(d.get("id") or p.stem))
                 for p, d in servers)
        return up and _statfs_ok(mountpoint)

    def restore(self, sn: Snapshotter) -> tuple[int, int, int]:
        """Before serving: adopt lazy mounts whose layer server still answers, mount again those that are dead
        or gone (a killed server, a reboot), forget records of removed snapshots. (adopted, remounted, failed)."""
        ids = sn.store.ids()
        adopted = remounted = failed = 0
        for r in self.table.all():
            if r.snapshot_id not in ids:
                self.release(Path(r.mountpoint))
                continue
            servers = self._servers_at(r.mountpoint)
            if self._alive(r.mountpoint, servers):
                adopted += 1
                continue
            if soci_mounts_at(r.mountpoint):
                force_unmount(r.mountpoint)
            self._end_servers(servers, grace=0.0)
            try:
                mount_layer(r.source, r.mountpoint, r.options, root=str(self.root))
                remounted += 1
                log.info("re-mounted layer %s at %s", r.layer_digest, r.mountpoint)
            except Exception as exc:  # noqa: BLE001 - one bad layer must not stop the daemon; the next start retries
                failed += 1
                log.error("cannot re-mount layer %s at %s: %s", r.layer_digest, r.mountpoint, exc)
        log.info("restored lazy layers: %d adopted, %d re-mounted, %d failed", adopted, remounted, failed)
        return adopted, remounted, failed


def _statfs_ok(path: str, timeout: float = 2.0) -> bool:
    """statfs reaches the layer server (stat may come from the kernel's cache); a hung server must not hang us."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.statvfs(path)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])
