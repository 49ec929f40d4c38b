"""containerd's generated API modules, e.g. `soci_helper.containerd.api.services.snapshots.v1.snapshots_pb2`."""

from __future__ import annotations

from ..protos import ensure_stubs

# The package's contents live in the stub cache, not here: point the import system there.
__path__ = [str(ensure_stubs())]
