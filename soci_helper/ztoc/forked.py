"""decode_raw on two cores: a forked child decodes the later entries of a zTOC while the caller reads the first."""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import struct
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import ZtocError
from . import codec
from .model import Ztoc

# Notes on the pipe: kind, where the marshalled payload lies in the memory file, and its size.
_NOTE = struct.Struct("<BQQ")
# Entries per batch: the caller takes up the child's entries a batch at a time.
BATCH_ENTRIES = 1024
# Below this many bytes of entries (4,000 of a real layer's) a fork costs more than the second core saves:
# building the table of 2,000 entries took 27 ms here and 40 ms forked; at 4,000 the two were alike.
FORK_MIN_TOC_BYTES = 512 << 10
# The share of the entries the caller decodes itself, while the child decodes the rest: the caller also
# turns every entry into its table and takes up the child's batches, so it decodes the smaller part.
# python-scipy's 31,000-entry table (15 runs, medians): 325 ms with the child decoding every entry, 263 ms
# with a fifth here, 287 ms with three tenths.
FIRST_SHARE = 0.2


def decodes_in_child(data: bytes, head: Ztoc, min_toc_bytes: int | None = None) -> bool:
    """Whether decode_raw_forked would fork for this zTOC (`head`: its decode_raw header): when its bytes
    besides the checkpoints reach min_toc_bytes (default FORK_MIN_TOC_BYTES)."""
    return len(data) - len(head.checkpoints) >= (FORK_MIN_TOC_BYTES if min_toc_bytes is None else min_toc_bytes)


def decode_raw_forked(data: bytes, min_toc_bytes: int | None = None,
                      decoded: tuple[Ztoc, Iterator[codec.RawEntry]] | None = None
                      ) -> tuple[Ztoc, Iterator[codec.RawEntry]]:
    """codec.decode_raw, with the later entries decoded by a forked child while the caller reads the first.

    Same contract: ZtocError from the call for the header and from the iterator for an entry (after every
    entry before it), UnorderedEntries from the iterator at the end. Falls back to decode_raw where fork is
    not possible or the entries are few (see decodes_in_child). `decoded`: what codec.decode_raw(data)
    returned, entries not yet read, for a caller that needed the header first. Call it from a
    single-threaded process (the child is a fork).
    """
    head, entries = decoded if decoded is not None else codec.decode_raw(data)
    if not decodes_in_child(data, head, min_toc_bytes) or not isinstance(entries, codec.RawEntries):
        return head, entries
    first, tail = entries.split(int(len(entries) * FIRST_SHARE))
    try:
        # The child's batches go to a memory file, and only their sizes through the pipe: the child never
        # waits for this process, which reads nothing until it is through the first part.
        buf = os.memfd_create("soci-ztoc-entries", os.MFD_CLOEXEC)
    except (OSError, AttributeError):
        return head, entries
    try:
        r, w = os.pipe()
    except OSError:
        os.close(buf)
        return head, entries
    try:
        pid = os.fork()
    except OSError:
        for fd in (r, w, buf):
            os.close(fd)
        return head, entries
    if pid == 0:  # leave without running any of the parent's exit handlers
        code = 1
        try:
            os.close(r)
            _produce(w, buf, tail)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    # Opened here, not in the generator: a generator never started still closes both when collected (and the
    # child, its notes unread, then fails its next write and exits).
    return head, _joined(first, tail, os.fdopen(r, "rb", buffering=0), os.fdopen(buf, "rb", buffering=0), pid)


def _produce(w: int, buf: int, tail: codec.RawTail) -> None:
    at = 0
    for kind, payload in tail.batches(BATCH_ENTRIES):
        data = marshal.dumps(payload)
        view, pos = memoryview(data), at
        while view:
            n = os.pwrite(buf, view, pos)
            view, pos = view[n:], pos + n
        os.write(w, _NOTE.pack(kind, at, len(data)))
        at += len(data)


def _joined(first: Iterator[codec.RawEntry], tail: codec.RawTail, notes: BinaryIO, buf: BinaryIO,
            pid: int) -> Iterator[codec.RawEntry]:
    done = False
    try:
        last = None
        unordered = False
        try:
            for entry in first:
                last = entry
                yield entry
        except codec.UnorderedEntries:
            unordered = True
        first_tail = True
        while True:
            note = notes.read(_NOTE.size)
            if note is None or len(note) != _NOTE.size:
                raise ZtocError("zTOC decoding failed: the decoding process died")
            kind, at, size = _NOTE.unpack(note)
            raw = os.pread(buf.fileno(), size, at)
            if len(raw) != size:
                raise ZtocError("zTOC decoding failed: the decoding process died")
            payload = marshal.loads(raw)
            if kind == codec.RawTail.BATCH:
                if first_tail and payload:
                    first_tail = False
                    if last is not None and payload[0][2] < (last[2] + last[3] + 511) & ~511:
                        unordered = True
                yield from payload
                continue
            done = True
            usage, error = payload
            unordered = tail.finish(usage) or unordered
            if error is not None:
                raise ZtocError(error)
            if unordered:
                raise codec.UnorderedEntries("zTOC entries are not stored in data order")
            return
    finally:
        notes.close()
        buf.close()
        if not done:
            # Stopped early (an error, or a consumer that had enough): the child's work is not wanted.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
