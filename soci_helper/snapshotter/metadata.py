"""Crash-safe snapshot metadata (sqlite, WAL): keys, parents, kinds, labels, times, ids and usage."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from ..errors import SociError

# containerd rejects a label whose key and value together exceed this (labels.Validate).
MAX_LABEL_SIZE = 4096


class Kind(IntEnum):
    """Snapshot kinds, numbered as containerd's snapshots API numbers them."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3


class SnapshotError(SociError):
    """A snapshot operation refused; `code` names the containerd error class (errdefs)."""

    code = "unknown"


class SnapshotNotFound(SnapshotError):
    code = "not_found"


class SnapshotExists(SnapshotError):
    code = "already_exists"


class SnapshotPrecondition(SnapshotError):
    code = "failed_precondition"


class SnapshotInvalid(SnapshotError):
    code = "invalid_argument"


@dataclass(slots=True)
class Snapshot:
    """One row: `id` names the snapshot's directory and never changes, even across Commit."""

    id: int
    key: str
    parent: str
    kind: Kind
    labels: dict[str, str] = field(default_factory=dict)
    created_ns: int = 0
    updated_ns: int = 0
    size: int = 0
    inodes: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    size: int
    inodes: int


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""

_COLUMNS = "id, key, parent, kind, labels, created_ns, updated_ns, size, inodes"


def validate_labels(labels: Mapping[str, str]) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise SnapshotInvalid(f"label key and value length ({len(k) + len(v)} bytes) greater than maximum "
                                  f"size ({MAX_LABEL_SIZE} bytes), key: {k[:64]}")


def _row(r: tuple[Any, ...]) -> Snapshot:
    return Snapshot(id=int(r[0]), key=str(r[1]), parent=str(r[2]), kind=Kind(int(r[3])),
                    labels=json.loads(str(r[4])), created_ns=int(r[5]), updated_ns=int(r[6]),
                    size=int(r[7]), inodes=int(r[8]))


class MetaStore:
    """The snapshot table. Every change is one sqlite transaction, so a crash leaves either the old or
    the new state; directory work passed in as hooks runs inside (create) or after (remove) it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's threads, serialised by a lock: calls are short.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a snapshot reported to containerd must survive a power cut, not only a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        with self._tx():
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    self._db.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _get(self, db: sqlite3.Connection, key: str) -> Snapshot | None:
        r = db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _row(r) if r else None

    def get(self, key: str) -> Snapshot:
        with self._lock:
            s = self._get(self._db, key)
        if s is None:
            raise SnapshotNotFound(f"snapshot {key} does not exist")
        return s

    def find(self, key: str) -> Snapshot | None:
        with self._lock:
            return self._get(self._db, key)

    def chain(self, s: Snapshot) -> list[Snapshot]:
        """The snapshot's ancestors, nearest first (what overlay's lowerdir lists)."""
        out: list[Snapshot] = []
        with self._lock:
            parent = s.parent
            while parent:
                p = self._get(self._db, parent)
                if p is None:
                    raise SnapshotNotFound(f"parent snapshot {parent} of {s.key} does not exist")
                out.append(p)
                parent = p.parent
        return out

    def create(self, key: str, parent: str, kind: Kind, labels: Mapping[str, str],
               hook: Callable[[Snapshot], None] | None = None) -> Snapshot:
        """Add an active or view snapshot; `hook` (e.g. making its directories) runs inside the
        transaction, so its failure leaves no row behind."""
        if not key:
            raise SnapshotInvalid("snapshot key must not be empty")
        validate_labels(labels)
        now = time.time_ns()
        with self._tx() as db:
            if self._get(db, key) is not None:
                raise SnapshotExists(f"snapshot {key} already exists")
            if parent:
                p = self._get(db, parent)
                if p is None:
                    raise SnapshotNotFound(f"parent snapshot {parent} does not exist")
                if p.kind != Kind.COMMITTED:
                    raise SnapshotInvalid(f"parent {parent} is not a committed snapshot")
            cur = db.execute(
                "INSERT INTO snapshots (key, parent, kind, labels, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?, ?)",
                (key, parent, int(kind), json.dumps(dict(labels), sort_keys=True), now, now))
            s = Snapshot(id=int(cur.lastrowid or 0), key=key, parent=parent, kind=kind, labels=dict(labels),
                         created_ns=now, updated_ns=now)
            if hook is not None:
                hook(s)
        return s

    def commit(self, key: str, name: str, labels: Mapping[str, str], usage: Usage) -> Snapshot:
        """Turn active `key` into committed `name`, keeping its id (and so its directory)."""
        if not name:
            raise SnapshotInvalid("committed snapshot name must not be empty")
        validate_labels(labels)
        now = time.time_ns()
        with self._tx() as db:
            s = self._get(db, key)
            if s is None:
                raise SnapshotNotFound(f"snapshot {key} does not exist")
            if s.kind != Kind.ACTIVE:
                raise SnapshotPrecondition(f"snapshot {key} is not an active snapshot")
            if self._get(db, name) is not None:
                raise SnapshotExists(f"snapshot {name} already exists")
            # Like containerd's own snapshotters, a commit carries the labels given to Commit.
            db.execute("UPDATE snapshots SET key = ?, kind = ?, labels = ?, created_ns = ?, updated_ns = ?, "
                       "size = ?, inodes = ? WHERE id = ?",
                       (name, int(Kind.COMMITTED), json.dumps(dict(labels), sort_keys=True), now, now,
                        usage.size, usage.inodes, s.id))
            return Snapshot(id=s.id, key=name, parent=s.parent, kind=Kind.COMMITTED, labels=dict(labels),
                            created_ns=now, updated_ns=now, size=usage.size, inodes=usage.inodes)

    def remove(self, key: str) -> Snapshot:
        """Delete the row; the caller removes the directory afterwards (an orphan dir is harmless)."""
        with self._tx() as db:
            s = self._get(db, key)
            if s is None:
                raise SnapshotNotFound(f"snapshot {key} does not exist")
            child = db.execute("SELECT key FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone()
            if child is not None:
                raise SnapshotPrecondition(f"cannot remove snapshot {key}: it has a child ({child[0]})")
            db.execute("DELETE FROM snapshots WHERE id = ?", (s.id,))
        return s

    def update(self, key: str, labels: Mapping[str, str], fieldpaths: Sequence[str]) -> Snapshot:
        """Change labels: no paths replaces them all; `labels` likewise; `labels.K` sets (or, when the
        new value is empty or absent, removes) one label. Other fields are immutable."""
        with self._tx() as db:
            s = self._get(db, key)
            if s is None:
                raise SnapshotNotFound(f"snapshot {key} does not exist")
            new = dict(s.labels)
            if not fieldpaths:
                new = dict(labels)
            for path in fieldpaths:
                if path.startswith("labels."):
                    k = path[len("labels."):]
                    new[k] = labels.get(k, "")
                elif path == "labels":
                    new = dict(labels)
                else:
                    raise SnapshotInvalid(f"cannot update {path!r} field on snapshot {key}")
            new = {k: v for k, v in new.items() if v != ""}
            validate_labels(new)
            now = time.time_ns()
            db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                       (json.dumps(new, sort_keys=True), now, s.id))
            s.labels, s.updated_ns = new, now
            return s

    def all(self) -> list[Snapshot]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY id").fetchall()
        return [_row(r) for r in rows]

    def ids(self) -> set[int]:
        with self._lock:
            return {int(r[0]) for r in self._db.execute("SELECT id FROM snapshots")}
