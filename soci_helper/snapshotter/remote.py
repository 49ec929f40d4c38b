"""The hook deciding, at Prepare, whether a layer is mounted lazily instead of unpacked locally."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import DigestError, LayerError, NotFound, ReferenceError_, RegistryError, SociError, ZtocError
from ..mount.helper import MountError
from .metadata import SnapshotError, SnapshotInvalid, SnapshotPrecondition, Usage

log = logging.getLogger(__name__)

# The label containerd's unpacker puts on Prepare: the chainID the layer will be committed as.
TARGET_REF_LABEL = "containerd.io/snapshot.ref"


@dataclass(frozen=True, slots=True)
class LayerRequest:
    """What a decider knows about one Prepare that names a target chainID."""

    key: str  # the active snapshot's key, namespaced by containerd (`ns/N/extract-... sha256:...`)
    parent: str  # the parent's key, "" for a base layer
    target: str  # the chainID the layer becomes (the `containerd.io/snapshot.ref` label)
    labels: Mapping[str, str]  # all Prepare labels (`containerd.io/snapshot/...` ones come from the client)
    mountpoint: Path  # the empty directory the lazy layer must be mounted on
    parent_dirs: tuple[Path, ...] = ()  # the parents' layer directories, nearest first


@dataclass(frozen=True, slots=True)
class RemoteLayer:
    """A lazy layer mounted on the request's mountpoint: the service commits it as the target and answers
    ALREADY_EXISTS, which tells containerd to skip downloading and unpacking it."""

    labels: Mapping[str, str] = field(default_factory=dict)  # added to the committed snapshot's labels
    usage: Usage = Usage(0, 0)  # walking a lazy layer to measure it would fetch it; the decider knows better


class RemoteLayerDecider(Protocol):
    def prepare(self, req: LayerRequest) -> RemoteLayer | None:
        """None: the layer is unpacked locally (containerd applies the diff into the active snapshot).
        Otherwise mount the layer on `req.mountpoint` before returning. An exception also means local."""
        ...

    def release(self, mountpoint: Path) -> None:
        """Unmount what `prepare` mounted there; called before a snapshot's directory is removed, and for
        leftovers found by Cleanup. Must not raise when nothing is mounted."""
        ...


class SnapshotUnavailable(SnapshotError):
    """A remote dependency (the registry, a layer server) failed for now; retrying later may work."""

    code = "unavailable"


class SnapshotInternal(SnapshotError):
    code = "internal"


def remote_error(exc: BaseException) -> SnapshotError:
    """The containerd error class of a failed remote Prepare: the registry or a layer server being down is
    UNAVAILABLE; content that cannot be used (bad digest, tar, zTOC, missing blob) is FAILED_PRECONDITION."""
    if isinstance(exc, SnapshotError):
        return exc
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, RegistryError | ConnectionError | TimeoutError):
        return SnapshotUnavailable(msg)
    if isinstance(exc, MountError):
        return SnapshotUnavailable(msg)
    if isinstance(exc, ReferenceError_):
        return SnapshotInvalid(msg)
    if isinstance(exc, DigestError | LayerError | ZtocError | NotFound | SociError):
        return SnapshotPrecondition(msg)
    try:
        import requests

        if isinstance(exc, requests.RequestException):
            return SnapshotUnavailable(msg)
    except ImportError:  # pragma: no cover - requests is a dependency
        pass
    return SnapshotInternal(f"{type(exc).__name__}: {msg}")


_MNT_DETACH = 2


def lazy_unmount(path: Path) -> bool:
    """umount2(MNT_DETACH): also works on a FUSE mount whose server died. True when something was unmounted."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.umount2(os.fsencode(str(path)), _MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
        log.warning("cannot unmount %s: %s", path, os.strerror(err))
    return False


class LocalOnly:
    """The default decider: every layer is unpacked locally."""

    def prepare(self, req: LayerRequest) -> RemoteLayer | None:
        return None

    def release(self, mountpoint: Path) -> None:
        lazy_unmount(mountpoint)
