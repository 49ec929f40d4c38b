"""containerd's filter language for List: `field==v`, `field!=v`, `field~=re`, `field`, joined by `,`."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .metadata import Kind, Snapshot, SnapshotInvalid

_QUOTES = '"/|'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_KIND_NAMES = {Kind.ACTIVE: "active", Kind.VIEW: "view", Kind.COMMITTED: "committed"}


@dataclass(frozen=True, slots=True)
class Selector:
    fieldpath: tuple[str, ...]
    op: str  # "" (present), "==", "!=", "~="
    value: str = ""

    def matches(self, s: Snapshot) -> bool:
        value, present = field_of(s, self.fieldpath)
        if self.op == "":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            # As containerd: an absent field compares as "" (so it differs from any non-empty value).
            return value != self.value
        return re.search(self.value, value) is not None


def field_of(s: Snapshot, path: tuple[str, ...]) -> tuple[str, bool]:
    """containerd's snapshot adaptor: kind, name, parent, labels.<key> (the rest of the path joined by `.`)."""
    head = path[0]
    if head == "kind":
        return _KIND_NAMES[s.kind], True
    if head == "name":
        return s.key, True
    if head == "parent":
        return s.parent, True
    if head == "labels" and len(path) > 1:
        k = ".".join(path[1:])
        return (s.labels[k], True) if k in s.labels else ("", False)
    return "", False


def _is_field_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch == "_")


class _Parser:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def fail(self, msg: str) -> SnapshotInvalid:
        return SnapshotInvalid(f"invalid filter {self.s!r} at {self.i}: {msg}")

    def skip_space(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def quoted(self) -> str:
        q = self.s[self.i]
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= len(self.s):
                raise self.fail("unterminated quoted string")
            ch = self.s[self.i]
            self.i += 1
            if ch == q:
                return "".join(out)
            if ch != "\\":
                out.append(ch)
                continue
            out.append(self.escape(q))

    def escape(self, q: str) -> str:
        if self.i >= len(self.s):
            raise self.fail("unterminated escape")
        ch = self.s[self.i]
        self.i += 1
        if ch == q:
            return q
        if q == "/" and ch not in _ESCAPES and ch not in "xuU01234567":
            # Inside /regex/, an unknown escape belongs to the regular expression.
            return "\\" + ch
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        width = {"x": 2, "u": 4, "U": 8}.get(ch)
        if width is not None:
            digits, base = self.s[self.i:self.i + width], 16
        else:
            digits, base, width = self.s[self.i - 1:self.i + 2], 8, 2
        try:
            code = int(digits, base)
        except ValueError:
            raise self.fail("bad escape") from None
        self.i += width
        return chr(code)

    def field(self) -> str:
        if self.peek() in _QUOTES and self.peek():
            return self.quoted()
        start = self.i
        while self.i < len(self.s) and _is_field_char(self.s[self.i]):
            self.i += 1
        if self.i == start:
            raise self.fail("expected a field name")
        return self.s[start:self.i]

    def selector(self) -> Selector:
        self.skip_space()
        path = [self.field()]
        while self.peek() == ".":
            self.i += 1
            path.append(self.field())
        self.skip_space()
        op = self.s[self.i:self.i + 2]
        if op not in ("==", "!=", "~="):
            if self.peek() in ("=", "!", "~"):
                raise self.fail("unknown operator")
            return Selector(tuple(path), "")
        self.i += 2
        self.skip_space()
        if self.peek() and self.peek() in _QUOTES:
            value = self.quoted()
        else:
            start = self.i
            while self.i < len(self.s) and self.s[self.i] != "," and not self.s[self.i].isspace():
                self.i += 1
            value = self.s[start:self.i]
            if not value:
                raise self.fail("expected a value")
        if op == "~=":
            try:
                re.compile(value)
            except re.error as exc:
                raise self.fail(f"bad regular expression: {exc}") from None
        return Selector(tuple(path), op, value)

    def parse(self) -> list[Selector]:
        out = [self.selector()]
        while True:
            self.skip_space()
            if self.i >= len(self.s):
                return out
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.i += 1
            out.append(self.selector())


def parse(text: str) -> list[Selector]:
    """One filter string: selectors that must all match. Empty matches everything."""
    if text == "":
        return []
    return _Parser(text).parse()


def compile_filters(filters: Sequence[str]) -> Callable[[Snapshot], bool]:
    """A predicate true when any filter matches (every snapshot when there are none)."""
    parsed = [parse(f) for f in filters]
    if not parsed:
        return lambda s: True
    return lambda s: any(all(sel.matches(s) for sel in sels) for sels in parsed)
