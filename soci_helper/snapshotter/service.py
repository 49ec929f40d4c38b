"""containerd.services.snapshots.v1.Snapshots over a unix socket: snapshot directories and overlay mounts."""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from ..config import Config
from ..containerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from ..containerd.api.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from ..containerd.api.types import mount_pb2
from . import filters, metrics
from .metadata import (
    Kind,
    MetaStore,
    Snapshot,
    SnapshotError,
    SnapshotExists,
    SnapshotInvalid,
    SnapshotPrecondition,
    Usage,
)
from .metrics import DaemonCounters
from .remote import TARGET_REF_LABEL, LayerRequest, LocalOnly, RemoteLayerDecider, remote_error
from .sockets import socket_accepts

log = logging.getLogger(__name__)

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "internal": grpc.StatusCode.INTERNAL,
}
LIST_BATCH = 100


@dataclass(frozen=True, slots=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


def disk_usage(path: Path) -> Usage:
    """Allocated bytes and inodes under `path`, hard links counted once, not crossing mounts."""
    seen: set[tuple[int, int]] = set()
    size = inodes = 0
    try:
        dev = path.lstat().st_dev
    except FileNotFoundError:
        return Usage(0, 0)
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != dev or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                inodes += 1
                size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return Usage(size, inodes)


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` (from /proc/self/mountinfo), deepest first."""
    prefix = str(path).rstrip("/")
    out = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) < 5:
            continue
        mp = _unescape_mountinfo(parts[4])
        if mp == prefix or mp.startswith(prefix + "/"):
            out.append(mp)
    return sorted(out, key=len, reverse=True)


def _dir_present(path: Path) -> bool:
    """is_dir that counts a dead FUSE mount (ENOTCONN) as present: its snapshot's layer server died, and the
    decider's restore mounts it again; stat raising there must not stop the daemon."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError:
        return bool(mounts_under(path))


def _overlay_index_on() -> bool:
    try:
        return Path("/sys/module/overlay/parameters/index").read_text().strip() == "Y"
    except OSError:
        return False


class Snapshotter:
    """The snapshotter's logic, independent of gRPC: ROOT/snapshotter/{metadata.db,snapshots/<id>/{fs,work}}."""

    def __init__(self, root: str | Path, config: Config | None = None,
                 decider: RemoteLayerDecider | None = None, counters: DaemonCounters | None = None) -> None:
        self.root = Path(root) / "snapshotter"
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.config = config or Config()
        self.decider: RemoteLayerDecider = decider or LocalOnly()
        self.counters = counters or metrics.DAEMON
        self.store = MetaStore(self.root / "metadata.db")
        # A kernel with overlay's inode index on refuses to reuse an upper/lower set elsewhere; containerd
        # turns it off per mount for the same reason.
        self._index_off = _overlay_index_on()
        self.recover()

    def close(self) -> None:
        closer = getattr(self.decider, "close", None)
        if callable(closer):
            closer()
        self.store.close()

    # --- directories --------------------------------------------------

    def dir_of(self, s: Snapshot | int) -> Path:
        return self.snapshots_dir / str(s if isinstance(s, int) else s.id)

    def fs_of(self, s: Snapshot) -> Path:
        return self.dir_of(s) / "fs"

    def _make_dirs(self, s: Snapshot) -> None:
        d = self.dir_of(s)
        if d.exists():
            # Left by a crash before its row was committed: the id is free again, so the dir is stale.
            self._remove_dir(d)
        d.mkdir(mode=0o700)
        (d / "fs").mkdir(mode=0o755)
        (d / "work").mkdir(mode=0o700)

    def _remove_dir(self, d: Path) -> bool:
        for mp in mounts_under(d):
            self.decider.release(Path(mp))
        left = mounts_under(d)
        if left:
            # Never recurse into a live mount: that would delete a layer's (or a container's) files.
            log.error("not removing %s: still mounted at %s", d, ", ".join(left))
            return False
        shutil.rmtree(d, ignore_errors=True)
        return True

    def recover(self) -> None:
        """After a crash: drop directories with no row, give rows their directories back."""
        removed = self.cleanup()
        for s in self.store.all():
            d = self.dir_of(s)
            if not _dir_present(d / "fs"):
                if s.kind == Kind.COMMITTED:
                    log.error("committed snapshot %s lost its directory %s", s.key, d)
                    continue
                (d / "fs").mkdir(parents=True, exist_ok=True)
                (d / "work").mkdir(parents=True, exist_ok=True)
        if removed:
            log.info("recovered: removed %d orphaned snapshot directories", removed)

    # --- mounts -------------------------------------------------------

    def mounts(self, s: Snapshot) -> list[Mount]:
        if s.kind == Kind.COMMITTED:
            raise SnapshotPrecondition(f"snapshot {s.key} is committed, not active or view")
        lowers = [str(self.fs_of(p)) for p in self.store.chain(s)]
        if not lowers:
            ro = "ro" if s.kind == Kind.VIEW else "rw"
            return [Mount("bind", str(self.fs_of(s)), (ro, "rbind"))]
        if s.kind == Kind.VIEW and len(lowers) == 1:
            return [Mount("bind", lowers[0], ("ro", "rbind"))]
        opts: list[str] = ["index=off"] if self._index_off else []
        if s.kind == Kind.ACTIVE:
            opts += [f"workdir={self.dir_of(s) / 'work'}", f"upperdir={self.fs_of(s)}"]
        opts.append("lowerdir=" + ":".join(lowers))
        return [Mount("overlay", "overlay", tuple(opts))]

    # --- operations ---------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        self.counters.operation("prepare")
        s = self.store.create(key, parent, Kind.ACTIVE, labels, hook=self._make_dirs)
        log.info("prepare %s (id %d, parent %s)", key, s.id, parent or "-")
        target = labels.get(TARGET_REF_LABEL, "")
        if target and self._try_remote(s, target, labels):
            raise SnapshotExists(f"target snapshot {target!r} already exists")
        return self.mounts(s)

    def _try_remote(self, s: Snapshot, target: str, labels: Mapping[str, str]) -> bool:
        """Ask the decider; on a lazy layer, commit it as `target` so containerd finds it by its labels."""
        req = LayerRequest(key=s.key, parent=s.parent, target=target, labels=dict(labels),
                           mountpoint=self.fs_of(s),
                           parent_dirs=tuple(self.fs_of(p) for p in self.store.chain(s)))
        try:
            layer = self.decider.prepare(req)
        except Exception as exc:  # noqa: BLE001 - every failure becomes one containerd error class
            err = remote_error(exc)
            self.counters.decision("failed")
            log.warning("prepare %s (target %s) failed: %s", s.key, target, err)
            self._abandon(s, req.mountpoint)
            raise err from None
        if layer is None:
            self.counters.decision("local")
            return False
        commit_labels = {**labels, **layer.labels}
        try:
            try:
                self.store.commit(s.key, target, commit_labels, layer.usage)
            except SnapshotExists:
                # Another namespace committed this chainID already; containerd finds that one only if the
                # parent matches, so keep ours under a unique name instead of dropping it.
                unique = f"{target}@{s.id}"
                self.store.commit(s.key, unique, commit_labels, layer.usage)
                target = unique
        except Exception:
            self._abandon(s, req.mountpoint)
            raise
        self.counters.decision("remote")
        log.info("remote layer %s committed as %s (id %d)", s.key, target, s.id)
        return True

    def _abandon(self, s: Snapshot, mountpoint: Path) -> None:
        """Undo a Prepare whose remote layer failed: no mount, no row, no directory is left."""
        try:
            self.decider.release(mountpoint)
        except Exception:  # noqa: BLE001 - the row and directory must still go
            log.exception("releasing %s failed", mountpoint)
        try:
            self.store.remove(s.key)
        except SnapshotError:
            pass
        self._remove_dir(self.dir_of(s))

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        self.counters.operation("view")
        s = self.store.create(key, parent, Kind.VIEW, labels, hook=self._make_dirs)
        log.info("view %s (id %d, parent %s)", key, s.id, parent or "-")
        return self.mounts(s)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        self.counters.operation("commit")
        s = self.store.get(key)
        fs = self.fs_of(s)
        # A lazy layer's size is what its decider said; walking FUSE would fetch metadata for nothing.
        usage = disk_usage(fs) if not mounts_under(fs) else Usage(s.size, s.inodes)
        c = self.store.commit(key, name, labels, usage)
        log.info("commit %s as %s (id %d, %d bytes)", key, name, c.id, usage.size)
        return c

    def remove(self, key: str) -> None:
        self.counters.operation("remove")
        s = self.store.remove(key)
        self._remove_dir(self.dir_of(s))
        log.info("remove %s (id %d)", key, s.id)

    def usage(self, key: str) -> Usage:
        s = self.store.get(key)
        if s.kind == Kind.ACTIVE and not mounts_under(self.fs_of(s)):
            return disk_usage(self.fs_of(s))
        return Usage(s.size, s.inodes)

    def list(self, filter_strings: list[str]) -> Iterator[Snapshot]:
        match = filters.compile_filters(filter_strings)
        return (s for s in self.store.all() if match(s))

    def cleanup(self) -> int:
        """Remove directories that no snapshot owns (left by crashes or failed removals)."""
        self.counters.operation("cleanup")
        known = self.store.ids()
        removed = 0
        for d in self.snapshots_dir.iterdir():
            if d.name.isdigit() and int(d.name) in known:
                continue
            if self._remove_dir(d):
                removed += 1
        return removed


def build_snapshotter(root: str, config: Config) -> Snapshotter:
    """The snapshotter the daemon serves: ROOT's metadata, the SOCI decider, and lazy mounts restored (adopted
    when their layer server still answers, mounted again when it died or the machine rebooted)."""
    from .soci import SociDecider

    decider = SociDecider(root, config)
    sn = Snapshotter(root, config, decider=decider)
    try:
        decider.restore(sn)
    except Exception:  # noqa: BLE001 - serving the snapshots that work beats refusing to start
        log.exception("restoring lazy layers failed")
    return sn


def _ts(ns: int, out: Any) -> None:
    out.seconds, out.nanos = divmod(ns, 1_000_000_000)


def info_pb(s: Snapshot) -> Any:
    info = pb.Info(name=s.key, parent=s.parent, kind=int(s.kind), labels=s.labels)
    _ts(s.created_ns, info.created_at)
    _ts(s.updated_ns, info.updated_at)
    return info


def mounts_pb(mounts: list[Mount]) -> list[Any]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


T = TypeVar("T")


class SnapshotsServicer(pb_grpc.SnapshotsServicer):
    """gRPC adapter: request in, Snapshotter call, containerd's status codes out."""

    def __init__(self, sn: Snapshotter) -> None:
        self.sn = sn

    def _call(self, context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SnapshotError as exc:
            log.debug("%s: %s", what, exc)
            context.abort(_CODES.get(exc.code, grpc.StatusCode.UNKNOWN), str(exc))
        except Exception as exc:
            log.exception("%s failed", what)
            context.abort(grpc.StatusCode.INTERNAL, f"{what}: {type(exc).__name__}: {exc}")
        raise AssertionError("unreachable")  # context.abort raises

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "prepare", lambda: self.sn.prepare(request.key, request.parent,
                                                                        dict(request.labels)))
        return pb.PrepareSnapshotResponse(mounts=mounts_pb(mounts))

    def View(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "view", lambda: self.sn.view(request.key, request.parent, dict(request.labels)))
        return pb.ViewSnapshotResponse(mounts=mounts_pb(mounts))

    def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
        mounts = self._call(context, "mounts", lambda: self.sn.mounts(self.sn.store.get(request.key)))
        return pb.MountsResponse(mounts=mounts_pb(mounts))

    def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        self._call(context, "commit", lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        self._call(context, "remove", lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
        s = self._call(context, "stat", lambda: self.sn.store.get(request.key))
        return pb.StatSnapshotResponse(info=info_pb(s))

    def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []

        def run() -> Snapshot:
            if not request.info.name:
                raise SnapshotInvalid("snapshot name must be set")
            self.sn.counters.operation("update")
            s = self.sn.store.update(request.info.name, dict(request.info.labels), paths)
            log.info("update %s (%s)", s.key, ",".join(paths) or "all labels")
            return s

        return pb.UpdateSnapshotResponse(info=info_pb(self._call(context, "update", run)))

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        items = self._call(context, "list", lambda: list(self.sn.list(list(request.filters))))
        for i in range(0, len(items), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_pb(s) for s in items[i:i + LIST_BATCH]])

    def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
        u = self._call(context, "usage", lambda: self.sn.usage(request.key))
        return pb.UsageResponse(size=u.size, inodes=u.inodes)

    def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
        from google.protobuf import empty_pb2

        n = self._call(context, "cleanup", self.sn.cleanup)
        if n:
            log.info("cleanup removed %d directories", n)
        return empty_pb2.Empty()


class Server:
    """The Snapshotter served on a unix socket; `stop()` is graceful and removes the socket."""

    def __init__(self, address: str, sn: Snapshotter, workers: int = 8) -> None:
        self.address = address
        self.sn = sn
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snap"))
        pb_grpc.add_SnapshotsServicer_to_server(SnapshotsServicer(sn), self._server)

    def start(self) -> None:
        sock = Path(self.address)
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            if not sock.is_socket():
                raise SnapshotInvalid(f"{sock} exists and is not a socket")
            if socket_accepts(sock):
                raise SnapshotExists(f"another snapshotter is already serving {sock}")
            # Left by a daemon that died: nobody listens on it any more.
            sock.unlink()
        if self._server.add_insecure_port(f"unix:{sock}") == 0:
            raise SnapshotInvalid(f"cannot listen on {sock}")
        self._server.start()
        os.chmod(sock, 0o660)
        log.info("serving snapshots on %s (root %s)", sock, self.sn.root)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace: float = 5.0) -> None:
        self._server.stop(grace).wait()
        try:
            Path(self.address).unlink()
        except FileNotFoundError:
            pass
        self.sn.close()
        log.info("stopped")
