"""What a mount's readers read, in order: the raw material of a load-order document."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..store.atomic import write_atomically

if TYPE_CHECKING:
    from .inodes import InodeTable

log = logging.getLogger(__name__)

# A start reads a few thousand segments (python-scipy: 1,065); a server left recording for days must not
# grow without bound, nor rewrite ever bigger records.
MAX_SEGMENTS = 100_000


class ReadRecorder:
    """File segments in the order they were first read.

    A read that continues the file's latest segment extends it, so a file read front to back is one
    segment; a read inside what was read already adds nothing. Cheap enough to sit in the read path
    (a dict lookup and a compare), and off unless the operator asks for it ([fuse] record_reads)."""

    def __init__(self) -> None:
        self.started = time.time()
        self._t0 = time.monotonic()
        # [inode, start, end, seconds since the mount started serving], in first-read order.
        self.segments: list[list[Any]] = []
        self._last: dict[int, list[Any]] = {}
        self._paths: dict[int, str] = {}  # resolved once, kept for the saves that follow
        self.changed = False
        self.full = False

    def add(self, ino: int, off: int, n: int) -> None:
        seg = self._last.get(ino)
        end = off + n
        if seg is not None and seg[1] <= off <= seg[2]:
            if end > seg[2]:
                seg[2] = end
                self.changed = True
            return
        if len(self.segments) >= MAX_SEGMENTS:
            if not self.full:
                self.full = True
                log.warning("read record full at %d segments; later reads are not recorded", MAX_SEGMENTS)
            return
        seg = [ino, off, end, round(time.monotonic() - self._t0, 4)]
        self.segments.append(seg)
        self._last[ino] = seg
        self.changed = True

    def document(self, table: InodeTable) -> dict[str, Any]:
        """{"started": epoch seconds, "reads": [{"path", "offset", "length", "t"}]}, paths from the layer root."""
        new = {s[0] for s in self.segments} - self._paths.keys()
        if new:
            self._paths.update(_paths(table, new))
        paths = self._paths
        reads = [{"path": paths[ino], "offset": a, "length": b - a, "t": t}
                 for ino, a, b, t in self.segments if ino in paths]
        return {"started": self.started, "reads": reads}

    def save(self, path: Path, table: InodeTable, extra: dict[str, Any]) -> None:
        """Write the document next to the mount's state file (temporary file, then rename)."""
        write_atomically(path, json.dumps({**extra, **self.document(table)}, separators=(",", ":")))
        self.changed = False


def _paths(table: InodeTable, inodes: set[int]) -> dict[int, str]:
    """'/a/b' for each inode (one name of a hard-linked file), looked up through its parents' listings."""
    names: dict[int, str] = {}
    parents = {table.parent[i] for i in inodes}
    todo = set(parents)
    while todo:  # every ancestor directory, so each listing is scanned once
        d = todo.pop()
        up = table.parent[d]
        if up and up != d and up not in parents:
            parents.add(up)
            todo.add(up)
    wanted = inodes | parents
    for d in parents:
        for name, ino in table.listing(d):
            if ino in wanted and table.parent[ino] == d and ino not in names:
                names[ino] = name.decode("utf-8", "surrogateescape")
    out: dict[int, str] = {}

    def full(ino: int) -> str | None:
        parts = []
        seen = 0
        while ino in names and seen < 4096:
            parts.append(names[ino])
            ino = table.parent[ino]
            seen += 1
        return "/" + "/".join(reversed(parts)) if parts else None

    for ino in inodes:
        p = full(ino)
        if p is not None:
            out[ino] = p
    return out


def load_order(paths: list[Path]) -> list[dict[str, Any]]:
    """One load-order document from the records of several mounts (the layers of one start), merged by the
    time of each first read: [{"path", "offset", "length"}], what `soci create --prefetch-files-json` takes.
    Unreadable or foreign files are skipped: a server may be writing its record at this moment."""
    timed: list[tuple[float, int, dict[str, Any]]] = []
    for k, path in enumerate(paths):
        try:
            doc = json.loads(path.read_text())
            started = float(doc["started"])
            reads = doc["reads"]
            for r in reads:
                item = {"path": str(r["path"]), "offset": int(r["offset"]), "length": int(r["length"])}
                timed.append((started + float(r["t"]), k, item))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    timed.sort(key=lambda x: (x[0], x[1]))
    return [item for _, _, item in timed]
