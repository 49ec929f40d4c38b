"""Upstream's span-range prefetch artifact: which spans of one zTOC to fetch at mount, in what order."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SociError

PREFETCH_ARTIFACT_VERSION = "1.0"


class PrefetchArtifactError(SociError):
    """A prefetch artifact is not valid JSON of the expected shape."""


@dataclass(frozen=True, slots=True)
class PrefetchSpan:
    """Spans start..end (inclusive); a lower priority is fetched earlier (upstream: 0 when absent)."""

    start: int
    end: int
    priority: int = 0


def encode(items: Iterable[PrefetchSpan]) -> bytes:
    """The artifact as upstream's Go code marshals it (field order, no spaces, priority omitted when 0)."""
    out = []
    for p in items:
        d: dict[str, int] = {"start_span": p.start, "end_span": p.end}
        if p.priority:
            d["priority"] = p.priority
        out.append(d)
    if not out:
        raise PrefetchArtifactError("a prefetch artifact needs at least one span")
    return json.dumps({"version": PREFETCH_ARTIFACT_VERSION, "prefetch_spans": out}, separators=(",", ":")).encode()


def _int(v: object) -> bool:
    # bool is an int in Python; JSON true is not a span id.
    return isinstance(v, int) and not isinstance(v, bool)


def decode(data: bytes, max_span_id: int | None = None) -> list[PrefetchSpan]:
    """Parse and check an artifact. With `max_span_id`, ranges past the layer's last span are an error."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrefetchArtifactError(f"prefetch artifact is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PrefetchArtifactError("prefetch artifact is not a JSON object")
    if doc.get("version") != PREFETCH_ARTIFACT_VERSION:
        raise PrefetchArtifactError(f"prefetch artifact version {doc.get('version')!r} is not supported "
                                    f"(expected {PREFETCH_ARTIFACT_VERSION!r})")
    items = doc.get("prefetch_spans")
    if not isinstance(items, list):
        raise PrefetchArtifactError("prefetch artifact has no prefetch_spans list")
    out: list[PrefetchSpan] = []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise PrefetchArtifactError(f"prefetch_spans[{k}] is not an object")
        start, end, prio = item.get("start_span"), item.get("end_span"), item.get("priority", 0)
        if not (_int(start) and _int(end)):
            raise PrefetchArtifactError(f"prefetch_spans[{k}] needs integer start_span and end_span")
        if not _int(prio):
            raise PrefetchArtifactError(f"prefetch_spans[{k}] has a priority that is not an integer")
        assert isinstance(start, int) and isinstance(end, int) and isinstance(prio, int)
        if start < 0 or end < start:
            raise PrefetchArtifactError(f"prefetch_spans[{k}] has a bad range {start}..{end}")
        if max_span_id is not None and end > max_span_id:
            raise PrefetchArtifactError(f"prefetch_spans[{k}] reaches span {end}; the layer's last is {max_span_id}")
        out.append(PrefetchSpan(start, end, prio))
    return out


def fetch_order(items: Iterable[PrefetchSpan]) -> list[int]:
    """Span ids in the order to fetch them: by priority, then as listed; each once."""
    seen: dict[int, None] = {}
    for p in sorted(items, key=lambda p: p.priority):  # stable: equal priorities keep their listed order
        for sid in range(p.start, p.end + 1):
            seen.setdefault(sid, None)
    return list(seen)


def from_order(span_ids: Iterable[int]) -> list[PrefetchSpan]:
    """Ranges for span ids given in the order they are needed: ascending neighbours share a range, and
    each range's priority is its place in the order, so a reader fetches them as the workload read them."""
    ranges: list[list[int]] = []
    seen: set[int] = set()
    for sid in span_ids:
        if sid in seen:
            continue
        seen.add(sid)
        if ranges and ranges[-1][1] == sid - 1:
            ranges[-1][1] = sid
        else:
            ranges.append([sid, sid])
    return [PrefetchSpan(a, b, k) for k, (a, b) in enumerate(ranges)]
