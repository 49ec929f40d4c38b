"""Per-mount counters of the lazy layer filesystem, published as JSON for `soci mounts`."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from ..store.atomic import write_atomically

# read_wait_us: microseconds reads spent waiting for spans to arrive, summed over concurrent reads.
_FIELDS = ("bytes_served", "bytes_fetched", "spans_fetched", "cache_hits", "cache_misses", "verify_failures",
           "read_wait_us")


class MountStats:
    """Thread-safe counters of one mount; `add` updates, `snapshot`/`to_json` read a consistent copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_served = 0
        self.bytes_fetched = 0
        self.spans_fetched = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.verify_failures = 0
        self.read_wait_us = 0

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                if name not in _FIELDS:
                    raise AttributeError(f"MountStats has no counter {name!r}")
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {name: getattr(self, name) for name in _FIELDS}

    def to_json(self, **extra: Any) -> str:
        """The counters (plus any `extra` keys, e.g. the layer digest) as one JSON object."""
        doc: dict[str, Any] = dict(extra)
        doc.update(self.snapshot())
        return json.dumps(doc, sort_keys=True)

    def write_atomically(self, path: str | os.PathLike[str], **extra: Any) -> None:
        """Write `to_json()` to `path` via a temp file and rename, so readers never see half a file."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, self.to_json(**extra) + "\n", mode=0o600)

    def __repr__(self) -> str:
        return f"MountStats({self.snapshot()})"

