"""Thin helpers for talking to containerd (or a snapshotter) over its gRPC unix socket."""

from __future__ import annotations

from typing import Any

import grpc

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
