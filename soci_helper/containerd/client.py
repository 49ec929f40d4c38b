"""Thin helpers for talking to containerd (or a snapshotter) over its gRPC unix socket."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import grpc

from ..errors import SociError

T = TypeVar("T")

# containerd reads the namespace of every call from this metadata key.
NAMESPACE_HEADER = "containerd-namespace"
DEFAULT_NAMESPACE = "default"
# ...and the lease that keeps what the call creates from garbage collection.
LEASE_HEADER = "containerd-lease"


def unix_target(address: str) -> str:
    """A grpc target for a socket path (`unix:` prefix added when missing)."""
    return address if address.startswith(("unix:", "unix-abstract:")) else f"unix:{address}"


def channel(address: str, **options: Any) -> grpc.Channel:
    """An insecure channel to a unix socket; large messages allowed, as containerd's own clients do."""
    opts = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]
    opts += list(options.items())
    return grpc.insecure_channel(unix_target(address), options=opts)


def namespace_metadata(namespace: str = DEFAULT_NAMESPACE, lease: str | None = None) -> tuple[tuple[str, str], ...]:
    """Metadata to pass as `metadata=` on every call into a containerd namespace (under a lease)."""
    md = ((NAMESPACE_HEADER, namespace),)
    return (*md, (LEASE_HEADER, lease)) if lease else md


def wait_ready(ch: grpc.Channel, timeout: float) -> None:
    """Block until the channel connects; grpc.FutureTimeoutError after `timeout` seconds."""
    grpc.channel_ready_future(ch).result(timeout=timeout)


def snapshots_stub(ch: grpc.Channel) -> Any:
    from .api.services.snapshots.v1 import snapshots_pb2_grpc

    return snapshots_pb2_grpc.SnapshotsStub(ch)


def content_stub(ch: grpc.Channel) -> Any:
    from .api.services.content.v1 import content_pb2_grpc

    return content_pb2_grpc.ContentStub(ch)


def images_stub(ch: grpc.Channel) -> Any:
    from .api.services.images.v1 import images_pb2_grpc

    return images_pb2_grpc.ImagesStub(ch)


def leases_stub(ch: grpc.Channel) -> Any:
    from .api.services.leases.v1 import leases_pb2_grpc

    return leases_pb2_grpc.LeasesStub(ch)


def diff_stub(ch: grpc.Channel) -> Any:
    from .api.services.diff.v1 import diff_pb2_grpc

    return diff_pb2_grpc.DiffStub(ch)


def namespaces_stub(ch: grpc.Channel) -> Any:
    from .api.services.namespaces.v1 import namespace_pb2_grpc

    return namespace_pb2_grpc.NamespacesStub(ch)


# --- a typed client for the services `soci image rpull` uses ---------------------------------------------------

# containerd's GC keeps whatever a lease holds until this label's time (RFC 3339) has passed.
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
DEFAULT_CALL_TIMEOUT = 120.0
# Applying a big layer takes as long as the disk needs; a deadline would only break slow machines.
APPLY_TIMEOUT: float | None = None
WRITE_CHUNK = 1 << 20


class ContainerdError(SociError):
    """containerd cannot be reached, or refused a call (the message names the call and containerd's reason)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def _details(exc: grpc.RpcError) -> str:
    text = (exc.details() if hasattr(exc, "details") else "") or str(exc)
    # Keep the report to one line whatever the server sent.
    return " ".join(text.split())


def rpc_error(exc: grpc.RpcError, what: str, address: str) -> ContainerdError:
    """One line for a failed call; connection failures say so plainly instead of quoting grpc's internals."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAVAILABLE and "connect" in _details(exc).lower() and "snapshotter" not in what:
        return ContainerdError(f"cannot connect to containerd at {address}: connection refused", code)
    if code == grpc.StatusCode.UNAVAILABLE and what.startswith("snapshotter "):
        name, _, call = what.partition(": ")
        return ContainerdError(f"containerd cannot reach {name} (is it running?): {call}: {_details(exc)}", code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ContainerdError(f"containerd {what}: timed out", code)
    name = code.name.lower() if code is not None else "error"
    return ContainerdError(f"containerd {what}: {_details(exc)} ({name})", code)


def is_code(exc: BaseException, code: grpc.StatusCode) -> bool:
    if isinstance(exc, ContainerdError):
        return exc.code == code
    return isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() == code


def _pb(module: str) -> Any:
    import importlib

    return importlib.import_module(f"soci_helper.containerd.api.{module}")


def descriptor_pb(media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None) -> Any:
    return _pb("types.descriptor_pb2").Descriptor(media_type=media_type, digest=digest, size=size,
                                                   annotations=annotations or {})


def _probe(address: str) -> None:
    """Fail at once, with the reason, where grpc would only retry until its deadline."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5.0)
        try:
            s.connect(address)
        except ConnectionRefusedError:
            raise ContainerdError(f"cannot connect to containerd at {address}: connection refused "
                                  f"(is containerd running?)") from None
        except PermissionError:
            raise ContainerdError(f"cannot connect to containerd at {address}: permission denied") from None
        except OSError:
            pass  # let grpc report whatever else it is


class Containerd:
    """One connection to containerd, calls in one namespace, optionally under a lease.

    Every failure is a ContainerdError; NOT_FOUND and ALREADY_EXISTS keep their code for callers to test.
    """

    def __init__(self, address: str, namespace: str = DEFAULT_NAMESPACE, timeout: float = DEFAULT_CALL_TIMEOUT,
                 connect_timeout: float = 5.0) -> None:
        self.address = address.removeprefix("unix://").removeprefix("unix:")
        self.namespace = namespace
        self.timeout = timeout
        self.lease: str | None = None
        path = Path(self.address)
        if not path.exists():
            raise ContainerdError(f"cannot connect to containerd at {self.address}: no such socket")
        if not path.is_socket():
            raise ContainerdError(f"cannot connect to containerd at {self.address}: not a socket")
        _probe(self.address)
        self.channel = channel(self.address)
        try:
            wait_ready(self.channel, connect_timeout)
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise ContainerdError(f"cannot connect to containerd at {self.address}: connection refused "
                                  f"(nothing answered within {connect_timeout:g}s)") from None
        self._content = content_stub(self.channel)
        self._snapshots = snapshots_stub(self.channel)
        self._images = images_stub(self.channel)
        self._leases = leases_stub(self.channel)
        self._diff = diff_stub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return namespace_metadata(self.namespace, self.lease)

    def _call(self, what: str, fn: Callable[..., T], request: Any,
              timeout: float | None | Literal["default"] = "default") -> T:
        try:
            return fn(request, metadata=self.metadata, timeout=self.timeout if timeout == "default" else timeout)
        except grpc.RpcError as exc:
            raise rpc_error(exc, what, self.address) from None

    # --- leases ---------------------------------------------------------

    def create_lease(self, lease_id: str, expire_in: float = 24 * 3600) -> str:
        """Create a lease expiring after `expire_in` seconds and make every later call of this client use it."""
        expire = datetime.now(UTC) + timedelta(seconds=expire_in)
        labels = {LEASE_EXPIRE_LABEL: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.lease = None
        self._call("create lease", self._leases.Create, _pb("services.leases.v1.leases_pb2").CreateRequest(
            id=lease_id, labels=labels))
        self.lease = lease_id
        return lease_id

    def delete_lease(self) -> None:
        """Release the lease (what it held stays if something else references it)."""
        lease, self.lease = self.lease, None
        if lease:
            pb = _pb("services.leases.v1.leases_pb2")
            self._call("delete lease", self._leases.Delete, pb.DeleteRequest(id=lease))

    # --- content --------------------------------------------------------

    def content_labels(self, digest: str) -> dict[str, str] | None:
        """A blob's labels, None when the content store does not have it."""
        pb = _pb("services.content.v1.content_pb2")
        try:
            info = self._call(f"content info {digest}", self._content.Info, pb.InfoRequest(digest=digest)).info
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return dict(info.labels)

    def update_content_labels(self, digest: str, labels: dict[str, str]) -> None:
        """Set these labels on a blob, leaving its other labels alone."""
        if not labels:
            return
        from google.protobuf import field_mask_pb2

        pb = _pb("services.content.v1.content_pb2")
        req = pb.UpdateRequest(info=pb.Info(digest=digest, labels=labels),
                               update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]))
        self._call(f"update labels of {digest}", self._content.Update, req)

    def write_content(self, ref: str, digest: str, size: int, chunks: Iterable[bytes],
                      labels: dict[str, str] | None = None) -> bool:
        """Stream a blob into the content store, committed with `labels` and verified by containerd against
        `digest` and `size`. False when the store already had it (nothing more is read from `chunks`)."""
        pb = _pb("services.content.v1.content_pb2")

        def requests() -> Iterator[Any]:
            offset = 0
            # Offset 0 on the first write makes containerd drop what an interrupted earlier write left.
            yield pb.WriteContentRequest(action=pb.STAT, ref=ref, total=size, expected=digest)
            for chunk in chunks:
                for i in range(0, len(chunk), WRITE_CHUNK):
                    part = chunk[i:i + WRITE_CHUNK]
                    yield pb.WriteContentRequest(action=pb.WRITE, ref=ref, offset=offset, data=part)
                    offset += len(part)
            yield pb.WriteContentRequest(action=pb.COMMIT, ref=ref, offset=offset, total=size, expected=digest,
                                         labels=labels or {})

        try:
            for _ in self._content.Write(requests(), metadata=self.metadata):
                pass
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                if labels:
                    self.update_content_labels(digest, labels)
                return False
            raise rpc_error(exc, f"write {digest}", self.address) from None
        return True

    def delete_content(self, digest: str) -> None:
        pb = _pb("services.content.v1.content_pb2")
        self._call(f"delete {digest}", self._content.Delete, pb.DeleteContentRequest(digest=digest))

    # --- snapshots ------------------------------------------------------

    def stat_snapshot(self, snapshotter: str, key: str) -> Any | None:
        """The snapshot's Info, None when it does not exist."""
        pb = _pb("services.snapshots.v1.snapshots_pb2")
        try:
            return self._call(f"snapshotter {snapshotter}: stat {key}", self._snapshots.Stat,
                              pb.StatSnapshotRequest(snapshotter=snapshotter, key=key)).info
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def prepare_snapshot(self, snapshotter: str, key: str, parent: str, labels: dict[str, str]) -> list[Any]:
        """The active snapshot's mounts; ContainerdError with code ALREADY_EXISTS when the snapshotter (or
        containerd) says the target already exists."""
        pb = _pb("services.snapshots.v1.snapshots_pb2")
        req = pb.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels)
        return list(self._call(f"snapshotter {snapshotter}: prepare {key}", self._snapshots.Prepare, req).mounts)

    def commit_snapshot(self, snapshotter: str, name: str, key: str, labels: dict[str, str]) -> None:
        pb = _pb("services.snapshots.v1.snapshots_pb2")
        req = pb.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels)
        self._call(f"snapshotter {snapshotter}: commit {key}", self._snapshots.Commit, req)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        pb = _pb("services.snapshots.v1.snapshots_pb2")
        self._call(f"snapshotter {snapshotter}: remove {key}", self._snapshots.Remove,
                   pb.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    # --- diff -----------------------------------------------------------

    def apply_layer(self, media_type: str, digest: str, size: int, mounts: list[Any]) -> str:
        """Unpack a layer blob (already in the content store) onto `mounts`; the diffID containerd computed."""
        pb = _pb("services.diff.v1.diff_pb2")
        req = pb.ApplyRequest(diff=descriptor_pb(media_type, digest, size), mounts=mounts)
        return str(self._call(f"apply layer {digest}", self._diff.Apply, req, timeout=APPLY_TIMEOUT).applied.digest)

    # --- images ---------------------------------------------------------

    def get_image(self, name: str) -> Any | None:
        pb = _pb("services.images.v1.images_pb2")
        try:
            return self._call(f"get image {name}", self._images.Get, pb.GetImageRequest(name=name)).image
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def put_image(self, name: str, target: Any, labels: dict[str, str] | None = None) -> bool:
        """Create the image record, or replace it (target and labels) when it exists; True when created."""
        pb = _pb("services.images.v1.images_pb2")
        image = pb.Image(name=name, target=target, labels=labels or {})
        try:
            self._call(f"create image {name}", self._images.Create, pb.CreateImageRequest(image=image))
            return True
        except ContainerdError as exc:
            if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                raise
        self._call(f"update image {name}", self._images.Update, pb.UpdateImageRequest(image=image))
        return False

    def delete_image(self, name: str, sync: bool = False) -> None:
        pb = _pb("services.images.v1.images_pb2")
        self._call(f"delete image {name}", self._images.Delete, pb.DeleteImageRequest(name=name, sync=sync))
