"""Pull hints: `soci image rpull` tells the daemon as it starts, and the daemon starts a spare layer server."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from soci_helper.config import Config
from soci_helper.mount.hints import HINT_FILE, MAX_HINT, HintListener, hint_path, parse, send


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


class Heard:
    """A listener's handler: the batches of hints it got, and an event set on each."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.got = threading.Event()

    def __call__(self, hints: list[str]) -> None:
        self.batches.append(hints)
        self.got.set()


def test_without_a_daemon_a_hint_goes_nowhere_and_creates_nothing(tmp_path: Path) -> None:
    t = time.monotonic()
    assert send(tmp_path) is False
    assert list(tmp_path.iterdir()) == []
    # A FIFO left by a daemon that was killed has no reader: the client hears so at once, it never blocks.
    os.mkfifo(tmp_path / HINT_FILE)
    assert send(tmp_path) is False
    assert time.monotonic() - t < 1.0
    # Whatever else has the name is never written to.
    (tmp_path / HINT_FILE).unlink()
    (tmp_path / HINT_FILE).write_text("keep")
    assert send(tmp_path) is False and (tmp_path / HINT_FILE).read_text() == "keep"


def test_listener_gets_each_burst_of_hints_and_cleans_up(tmp_path: Path) -> None:
    heard = Heard()
    got, calls = heard.got, heard.batches
    (tmp_path / HINT_FILE).write_text("not a fifo")  # taken over: a FIFO is made in its place
    lis = HintListener(tmp_path, heard)
    assert lis.start()
    try:
        assert stat.S_ISFIFO(os.lstat(hint_path(tmp_path)).st_mode)
        assert stat.S_IMODE(os.lstat(hint_path(tmp_path)).st_mode) == 0o600
        assert send(tmp_path) is True
        assert got.wait(5.0) and len(calls) == 1
        got.clear()
        for _ in range(50):
            assert send(tmp_path)
        assert got.wait(5.0)
        time.sleep(0.2)
        assert 2 <= len(calls) <= 51  # a burst may come as one hint; none is lost entirely
        # A handler that fails does not stop the listener.
        lis.on_hint = lambda hints: (_ for _ in ()).throw(RuntimeError("boom"))
        assert send(tmp_path)
        time.sleep(0.2)
        lis.on_hint = heard
        got.clear()
        assert send(tmp_path) and got.wait(5.0)
    finally:
        lis.close()
    assert not hint_path(tmp_path).exists() and send(tmp_path) is False
    assert not any(t.name == "pull-hints" for t in threading.enumerate())


def test_hints_name_the_image_and_junk_is_dropped(tmp_path: Path) -> None:
    heard = Heard()
    got, batches = heard.got, heard.batches
    lis = HintListener(tmp_path, heard)
    assert lis.start()
    try:
        assert send(tmp_path, "reg.example/app:v1", "sha256:" + "a" * 64)
        assert got.wait(5.0) and batches == [["reg.example/app:v1 sha256:" + "a" * 64]]
        got.clear()
        # Too long or not printable ASCII: sent as a bare hint (still worth a spare).
        assert send(tmp_path, "r/" + "x" * MAX_HINT)
        assert got.wait(5.0) and batches[-1] == []
    finally:
        lis.close()
    assert parse(b"a:1\nb:2\na:1\n\n\xff\xfe\nc\x07d\n" + b"y" * MAX_HINT + b"\n") == ["a:1", "b:2"]
    assert parse(b"".join(b"i%d\n" % k for k in range(20))) == [f"i{k}" for k in range(8)]


def test_a_fifo_left_behind_is_reused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / HINT_FILE, 0o600)
    got = threading.Event()
    lis = HintListener(tmp_path, lambda hints: got.set())
    assert lis.start()
    try:
        assert send(tmp_path) and got.wait(5.0)
    finally:
        lis.close()


def test_a_root_the_daemon_cannot_write_turns_hints_off(tmp_path: Path) -> None:
    lis = HintListener(tmp_path / "missing" / "dir", lambda hints: None)
    assert lis.start() is False
    lis.close()


def _spare_alive(dec: object) -> bool:
    spares = dec.spares._spares  # type: ignore[attr-defined]
    return len(spares) == 1 and spares[0].proc.poll() is None


def test_the_daemon_starts_a_spare_on_a_hint_and_stops_it_on_close(tmp_path: Path) -> None:
    from soci_helper.snapshotter.soci import SociDecider

    root = tmp_path / "root"
    dec = SociDecider(root)
    try:
        assert not _spare_alive(dec)
        assert send(root)
        assert _wait(lambda: _spare_alive(dec))
        spare = dec.spares._spares[0]
        assert "--spare" in Path(f"/proc/{spare.proc.pid}/cmdline").read_text().split("\0")
        assert send(root)  # a second hint while a spare waits starts no other
        time.sleep(0.3)
        assert dec.spares._spares == [spare]
    finally:
        dec.close()
    assert spare.proc.poll() is not None and not hint_path(root).exists()


def test_with_lazy_pulls_off_a_hint_starts_nothing(tmp_path: Path) -> None:
    from soci_helper.snapshotter.soci import SociDecider

    cfg = Config()
    cfg.pull_modes.soci_v1.enable = False
    cfg.pull_modes.soci_v2.enable = False
    root = tmp_path / "root"
    dec = SociDecider(root, cfg)
    try:
        assert send(root)
        time.sleep(0.5)
        assert not dec.spares._spares
    finally:
        dec.close()


@pytest.mark.timeout(60)
def test_rpull_hints_before_loading_grpc_and_still_reports_its_error(tmp_path: Path) -> None:
    """The CLI end: the hint arrives although containerd is not there; the command's one error line survives the
    quick exit (stderr is a pipe here, so it must be flushed before the process ends)."""
    root = tmp_path / "root"
    root.mkdir()
    heard = Heard()
    lis = HintListener(root, heard)
    assert lis.start()
    try:
        r = subprocess.run([sys.executable, "-m", "soci_helper.cli.main", "--root", str(root),
                            "-a", str(tmp_path / "no-containerd.sock"), "image", "rpull", "--plain-http",
                            "127.0.0.1:9/none/such:latest"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert heard.got.wait(5.0)
    finally:
        lis.close()
    assert heard.batches == [["127.0.0.1:9/none/such:latest"]]  # the image, for the daemon to look up meanwhile
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("soci: error: "), r.stderr


def test_a_pool_warms_up_to_max_spares_and_drops_them_all(tmp_path: Path) -> None:
    from soci_helper.mount.spares import MAX_SPARES, SparePool

    pool = SparePool(tmp_path / "root", idle_sec=30)
    try:
        pool.warm(MAX_SPARES + 2)
        spares = list(pool._spares)
        assert len(spares) == MAX_SPARES and all(s.proc.poll() is None for s in spares)
        pool.warm(1)  # enough of them already: nothing new
        assert pool._spares == spares
        first = pool.take()
        assert first is spares[0] and pool._spares == spares[1:]
        first.release()
        pool.drop()
        assert not pool._spares and all(s.proc.poll() is not None for s in spares)
    finally:
        pool.close()
