"""decode_raw_forked against decode_raw: the same entries, the same errors, and no child process left over."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
from test_codec import _craft, make_ztoc

from soci_helper.errors import ZtocError
from soci_helper.fs.inodes import InodeTable
from soci_helper.ztoc import codec, forked
from soci_helper.ztoc.forked import decode_raw_forked, decodes_in_child
from soci_helper.ztoc.model import Ztoc


def _children() -> set[str]:
    pid = os.getpid()
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


@pytest.fixture(autouse=True)
def no_child_left():
    """Other tests' fixtures may have children of this process running: compare with what was there before."""
    before = _children()
    yield
    assert _children() <= before


@pytest.fixture(autouse=True)
def always_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the child: fork whatever the zTOC's size (see the last test for the threshold)."""
    monkeypatch.setattr(forked, "FORK_MIN_TOC_BYTES", 0)


def _many(count: int = 3089) -> Ztoc:
    return make_ztoc(count=count, seed=3)


def test_same_entries_as_decode_raw_across_batches():
    data = codec.encode(_many())
    head, serial = codec.decode_raw(data)
    fhead, forked = decode_raw_forked(data)
    assert fhead == head
    serial_entries = list(serial)
    assert list(forked) == serial_entries
    # A caller that decoded the header already hands it over; the entries still come from the child.
    again = codec.decode_raw(data)
    assert decodes_in_child(data, again[0])
    dhead, dentries = decode_raw_forked(data, decoded=again)
    assert dhead is again[0] and dentries is not again[1] and list(dentries) == serial_entries


def test_an_entry_error_after_some_batches_is_the_same_error():
    z = _many()
    z.files[-1].uncompressed_size = z.uncompressed_archive_size  # the last entry runs past the archive
    data = codec.encode(z)
    with pytest.raises(ZtocError) as serial:
        list(codec.decode_raw(data)[1])
    got = []
    with pytest.raises(ZtocError) as forked:
        got.extend(decode_raw_forked(data)[1])
    assert str(forked.value) == str(serial.value) and "outside the archive" in str(forked.value)
    assert len(got) == len(z.files) - 1  # everything before the bad entry was delivered


def test_unordered_entries_are_reported_at_the_end_and_the_table_falls_back():
    z = _many(1029)
    z.files.reverse()
    data = codec.encode(z)
    got = []
    with pytest.raises(codec.UnorderedEntries):
        got.extend(decode_raw_forked(data)[1])
    assert len(got) == len(z.files)
    forked, _ = InodeTable.from_bytes(data, forked=True)
    serial, _ = InodeTable.from_bytes(data)
    assert forked.listing(1) == serial.listing(1) and len(forked) == len(serial)


def test_forked_table_equals_the_serial_one():
    data = codec.encode(_many())
    forked, fhead = InodeTable.from_bytes(data, forked=True)
    serial, shead = InodeTable.from_bytes(data)
    keep = [k for k in serial.__dict__ if k not in ("warn", "_views")]
    assert {k: forked.__dict__[k] for k in keep} == {k: serial.__dict__[k] for k in keep}
    assert fhead == shead


def test_a_consumer_that_stops_early_leaves_no_child():
    data = codec.encode(_many())
    _, entries = decode_raw_forked(data)
    assert next(entries)[0]
    entries.close()  # type: ignore[attr-defined]


def test_only_a_big_table_is_decoded_in_a_child(monkeypatch: pytest.MonkeyPatch) -> None:
    data = codec.encode(_many())
    head, _ = codec.decode_raw(data)
    toc_bytes = len(data) - len(head.checkpoints)
    forks: list[int] = []
    real_fork = os.fork

    def counting_fork() -> int:
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", counting_fork)
    assert not decodes_in_child(data, head, toc_bytes + 1) and decodes_in_child(data, head, toc_bytes)
    _, entries = decode_raw_forked(data, min_toc_bytes=toc_bytes + 1)  # a byte short of the threshold
    assert forks == [] and len(list(entries)) == len(_many().files)
    _, entries = decode_raw_forked(data, min_toc_bytes=toc_bytes)
    assert forks == [1] and len(list(entries)) == len(_many().files)
    # The module's threshold (put back here: the fixture set it to 0) keeps a 50-entry zTOC in process.
    monkeypatch.setattr(forked, "FORK_MIN_TOC_BYTES", 512 << 10)
    small = codec.encode(make_ztoc(count=50, seed=4))
    _, entries = decode_raw_forked(small)
    assert forks == [1] and len(list(entries)) == 50


def test_data_order_is_checked_across_the_cut(monkeypatch: pytest.MonkeyPatch):
    z = _many(1000)
    k = int(len(z.files) * forked.FIRST_SHARE)
    # Each part in data order, the two parts swapped: only the cut between them is out of order.
    z.files = z.files[-k:] + z.files[:-k]
    data = codec.encode(z)
    head, entries = codec.decode_raw(data)
    first, tail = entries.split(k)  # type: ignore[attr-defined]
    assert len(list(first)) == k
    *batches, (_, ((_, _, unordered), error)) = tail.batches(100)
    assert sum(len(b) for _, b in batches) == len(z.files) - k and not unordered and error is None
    got = []
    with pytest.raises(codec.UnorderedEntries):
        got.extend(decode_raw_forked(data)[1])
    assert len(got) == len(z.files)
    table, _ = InodeTable.from_bytes(data, forked=True)
    assert table.listing(1) == InodeTable.from_bytes(data)[0].listing(1)


def test_text_read_by_both_processes_counts_against_the_buffer(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(forked, "FIRST_SHARE", 0.5)
    data = _craft(entries=4, name=b"n" * 41, usize=1 << 40)  # one entry table listed four times
    with pytest.raises(ZtocError) as serial:
        list(codec.decode_raw(data)[1])
    assert "more text" in str(serial.value)
    # Either half alone stays within the buffer's size: only the sum of the two is too much.
    first, _ = codec.decode_raw(data)[1].split(2)  # type: ignore[attr-defined]
    with pytest.raises(codec.UnorderedEntries):
        list(first)
    _, tail = codec.decode_raw(data)[1].split(2)  # type: ignore[attr-defined]
    *_, (_, (_, error)) = tail.batches(100)
    assert error is None
    with pytest.raises(ZtocError) as both:
        list(decode_raw_forked(data)[1])
    assert str(both.value) == str(serial.value)


def test_an_error_in_the_first_part_stops_the_child():
    z = _many()
    z.files[3].uncompressed_size = z.uncompressed_archive_size  # early: in the part this process decodes
    data = codec.encode(z)
    got = []
    with pytest.raises(ZtocError, match="outside the archive"):
        got.extend(decode_raw_forked(data)[1])
    assert len(got) == 3


def test_a_result_never_read_closes_its_descriptors():
    before_fds = set(os.listdir("/proc/self/fd"))
    before = _children()
    _, entries = decode_raw_forked(codec.encode(_many()))
    (child,) = _children() - before
    del entries
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= before_fds
    # Its notes unread, the child fails its next write and exits; reaped here so that no zombie stays.
    assert os.waitpid(int(child), 0)[0] == int(child)
