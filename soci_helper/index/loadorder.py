"""Load orders given to `soci create`/`convert`: parsing them, and mapping them to the spans of each layer."""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SociError
from ..ztoc.model import DIR, HARDLINK, REG, Ztoc
from ..ztoc.reader import normalize_name, parse_zinfo
from ..ztoc.zinfo import Zinfo, spans_of

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
# Hard links may point at hard links; a chain this long is a broken or hostile layer, not a real one.
_MAX_LINK_HOPS = 64
_ITEM_KEYS = frozenset({"path", "offset", "length"})


class LoadOrderError(SociError):
    """A prefetch path or load-order document is not usable."""


@dataclass(frozen=True, slots=True)
class LoadOrderItem:
    """One file segment a workload reads: `length` None means to the file's end."""

    path: str
    offset: int = 0
    length: int | None = None


def item_for_path(path: str, where: str = "--prefetch-file") -> LoadOrderItem:
    """A whole file, named by its path in the image."""
    if not isinstance(path, str) or not normalize_name(path):
        raise LoadOrderError(f"{where}: {path!r} does not name a file")
    return LoadOrderItem(path)


def _non_negative(v: Any) -> bool:
    # bool is an int in Python; JSON true is not an offset.
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_document(data: bytes, where: str) -> list[LoadOrderItem]:
    """A JSON array of paths (upstream's --prefetch-files-json) or of {path, offset, length} objects."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadOrderError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, list):
        raise LoadOrderError(f"{where}: expected a JSON array of paths or {{path, offset, length}} objects")
    items: list[LoadOrderItem] = []
    for k, raw in enumerate(doc):
        at = f"{where}: item {k}"
        if isinstance(raw, str):
            items.append(item_for_path(raw, at))
            continue
        if not isinstance(raw, dict):
            raise LoadOrderError(f"{at}: expected a path string or a {{path, offset, length}} object")
        # Unknown keys are refused: a misspelt "lenght" would otherwise silently prefetch whole files.
        extra = sorted(set(raw) - _ITEM_KEYS)
        if extra:
            raise LoadOrderError(f"{at}: unknown key {extra[0]!r} (expected path, offset, length)")
        path = raw.get("path")
        if not isinstance(path, str):
            raise LoadOrderError(f"{at}: needs a string path")
        offset = raw.get("offset", 0)
        if not _non_negative(offset):
            raise LoadOrderError(f"{at}: offset must be a non-negative integer, not {json.dumps(offset)}")
        length = raw.get("length")
        if length is not None and not _non_negative(length):
            raise LoadOrderError(f"{at}: length must be a non-negative integer, not {json.dumps(length)}")
        items.append(LoadOrderItem(item_for_path(path, at).path, offset, length))
    return items


def read_document(path: str) -> list[LoadOrderItem]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LoadOrderError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_document(data, path)


class _LayerView:
    """Name lookups in one zTOC, with tar's rule that a later entry of the same name wins."""

    def __init__(self, ztoc: Ztoc) -> None:
        self.files = ztoc.files
        self.ztoc = ztoc
        self._zinfo: Zinfo | None = None
        self.positions: dict[str, list[int]] = {}
        for i, f in enumerate(ztoc.files):
            self.positions.setdefault(normalize_name(f.name), []).append(i)

    def last(self, name: str) -> int | None:
        pos = self.positions.get(name)
        return pos[-1] if pos else None

    def hides_lower(self, name: str) -> bool:
        """True if this layer keeps lower layers' `name` out of the merged view, as overlayfs would."""
        parts = name.split("/")
        for i in range(len(parts)):
            parent = "/".join(parts[:i])
            prefix = parent + "/" if parent else ""
            if prefix + WHITEOUT_PREFIX + parts[i] in self.positions:
                return True
            if prefix + OPAQUE_MARKER in self.positions:
                return True
            # A file or symlink where a lower layer had a directory replaces the whole subtree.
            if i and (pos := self.last(parent)) is not None and self.files[pos].type != DIR:
                return True
        return False

    def spans(self, pos: int, item: LoadOrderItem) -> range:
        entry = self.files[pos]
        for _ in range(_MAX_LINK_HOPS):
            if entry.type != HARDLINK:
                break
            # A hard link names a member earlier in the same archive.
            targets = self.positions.get(normalize_name(entry.linkname), [])
            k = bisect.bisect_left(targets, pos)
            if not k:
                return range(0)
            pos = targets[k - 1]
            entry = self.files[pos]
        if entry.type != REG:
            return range(0)
        size = entry.uncompressed_size
        start = min(item.offset, size)
        end = size if item.length is None else min(size, item.offset + item.length)
        if end <= start:
            return range(0)
        if self._zinfo is None:
            self._zinfo = parse_zinfo(self.ztoc)
        return spans_of(self._zinfo, entry.uncompressed_offset + start, end - start)


@dataclass(slots=True)
class SpanPlan:
    """Span ids per layer digest in the order the load order first needs them; items no layer holds."""

    spans: dict[str, list[int]] = field(default_factory=dict)
    missing: list[LoadOrderItem] = field(default_factory=list)


def plan_spans(items: Sequence[LoadOrderItem], layers: Iterable[tuple[str, Callable[[], Ztoc]]]) -> SpanPlan:
    """Map `items` onto `layers` (topmost first, each a layer digest and a loader of its zTOC).

    Each item takes the topmost layer holding its path, unless a higher layer whites it out (or a parent
    of it, or makes a parent opaque, or replaces a parent with a non-directory). Layers are loaded one at
    a time and only while some item is unresolved, so one zTOC is in memory at once.
    """
    pending = [(k, it, normalize_name(it.path)) for k, it in enumerate(items)]
    found: dict[int, tuple[str, range]] = {}
    for layer_digest, load in layers:
        if not pending:
            break
        view = _LayerView(load())
        rest = []
        for k, it, name in pending:
            pos = view.last(name)
            if pos is not None:
                found[k] = (layer_digest, view.spans(pos, it))
            elif not view.hides_lower(name):
                rest.append((k, it, name))
            # else: whited out above every lower copy, so it is in no layer of the image
        pending = rest
    out = SpanPlan()
    for k, it in enumerate(items):
        if k not in found:
            out.missing.append(it)
            continue
        layer_digest, ids = found[k]
        if ids:
            have = out.spans.setdefault(layer_digest, [])
            have.extend(ids)
    # Keep each id at its first need only.
    out.spans = {d: list(dict.fromkeys(ids)) for d, ids in out.spans.items()}
    return out
