"""The artifacts database: which SOCI indexes and zTOCs the store holds, and what they belong to."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from ..errors import StoreError

TYPE_INDEX = "soci_index"
TYPE_ZTOC = "ztoc"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts (
    digest          TEXT PRIMARY KEY,
    type            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    original_digest TEXT NOT NULL,
    image_digest    TEXT NOT NULL DEFAULT '',
    image_ref       TEXT NOT NULL DEFAULT '',
    platform        TEXT NOT NULL DEFAULT '',
    span_size       INTEGER NOT NULL DEFAULT 0,
    media_type      TEXT NOT NULL DEFAULT '',
    artifact_type   TEXT NOT NULL DEFAULT '',
    created_at      TEXT NOT NULL,
    head_span       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS artifacts_original ON artifacts(type, original_digest);
"""


@dataclass(slots=True)
class ArtifactEntry:
    """One row. For an index, original_digest is the image manifest; for a zTOC, the layer."""

    digest: str
    type: str
    size: int
    original_digest: str
    image_digest: str = ""
    image_ref: str = ""
    platform: str = ""
    span_size: int = 0
    media_type: str = ""
    artifact_type: str = ""
    created_at: str = ""
    head_span: int = 0  # zTOCs: the head span given to big files, 0 for upstream's layout


_COLUMNS = [f.name for f in fields(ArtifactEntry)]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ArtifactsDB:
    """A small sqlite database shared by every process using the store (WAL, busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._retry(lambda: self._db.execute("PRAGMA journal_mode = WAL"))
            self._retry(lambda: self._db.executescript(_SCHEMA))
            self._retry(self._migrate)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"artifacts database {self.path} is unusable: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Bring a database made by an older version up to this schema (columns are only ever added)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(artifacts)")}
        if "head_span" not in have:
            try:
                self._db.execute("ALTER TABLE artifacts ADD COLUMN head_span INTEGER NOT NULL DEFAULT 0")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it first
                    raise

    def __enter__(self) -> ArtifactsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _retry(fn):  # type: ignore[no-untyped-def]
        # Schema set-up races with other processes opening the same fresh file.
        for attempt in range(50):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05)
        return None

    def put(self, entry: ArtifactEntry) -> None:
        if not entry.created_at:
            entry.created_at = now_rfc3339()
        cols = ",".join(_COLUMNS)
        marks = ",".join("?" for _ in _COLUMNS)
        values = [getattr(entry, c) for c in _COLUMNS]
        try:
            self._retry(lambda: self._db.execute(f"INSERT OR REPLACE INTO artifacts ({cols}) VALUES ({marks})", values))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot record artifact {entry.digest}: {exc}") from exc

    def get(self, digest: str) -> ArtifactEntry | None:
        rows = list(self._query("digest = ?", (digest,)))
        return rows[0] if rows else None

    def remove(self, digest: str) -> bool:
        cur = self._retry(lambda: self._db.execute("DELETE FROM artifacts WHERE digest = ?", (digest,)))
        return bool(cur.rowcount)

    def clear(self) -> None:
        self._retry(lambda: self._db.execute("DELETE FROM artifacts"))

    def indexes(self, original_digest: str | None = None) -> list[ArtifactEntry]:
        if original_digest:
            return list(self._query("type = ? AND original_digest = ?", (TYPE_INDEX, original_digest)))
        return list(self._query("type = ?", (TYPE_INDEX,)))

    def ztocs(self, layer_digest: str | None = None) -> list[ArtifactEntry]:
        if layer_digest:
            return list(self._query("type = ? AND original_digest = ?", (TYPE_ZTOC, layer_digest)))
        return list(self._query("type = ?", (TYPE_ZTOC,)))

    def find_ztoc(self, layer_digest: str, span_size: int, head_span: int = 0) -> ArtifactEntry | None:
        rows = list(
            self._query("type = ? AND original_digest = ? AND span_size = ? AND head_span = ?",
                        (TYPE_ZTOC, layer_digest, span_size, head_span))
        )
        return rows[0] if rows else None

    def all(self) -> list[ArtifactEntry]:
        return list(self._query("1 = 1", ()))

    def _query(self, where: str, args: tuple) -> Iterator[ArtifactEntry]:
        sql = f"SELECT {','.join(_COLUMNS)} FROM artifacts WHERE {where} ORDER BY created_at DESC, digest"
        try:
            rows = self._retry(lambda: self._db.execute(sql, args).fetchall())
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"artifacts database {self.path} is unusable: {exc}") from exc
        for row in rows:
            yield ArtifactEntry(*row)
