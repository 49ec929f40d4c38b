"""Pull hints: a FIFO in the store root on which a client about to pull tells the daemon which image comes.

A spare layer server takes a quarter of a second to start its interpreter and imports, and the daemon's index
discovery (manifest, referrers, index, zTOCs) some round trips more; `soci image rpull` spends about as long
importing gRPC and requests and resolving the image before its first Prepare arrives. A hint sent as rpull
starts lets the daemon start a spare and look the image's index up meanwhile. A hint is one line on a FIFO,
`IMAGE[ INDEX-DIGEST]` (or empty): opening it costs the client no import, a missing reader (no daemon) answers
at once, and the path has no length limit (a unix socket's has). Hints are advisory: a lost or wrong one only
costs the overlap; the Prepare decides as always.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HINT_FILE = "pull-hints"
# At most this long a line: written at once (less than PIPE_BUF), so hints from two clients never interleave.
MAX_HINT = 1024


def hint_path(root: str | os.PathLike[str]) -> Path:
    return Path(root) / HINT_FILE


def send(root: str | os.PathLike[str], image: str = "", index_digest: str = "") -> bool:
    """Tell the daemon serving `root` that a pull of `image` starts; False if no daemon listens there. Never
    blocks."""
    line = " ".join(filter(None, (image, index_digest)))
    data = line.encode() + b"\n"
    if len(data) > MAX_HINT or not line.isascii() or not line.isprintable():
        data = b"\n"  # still worth a spare
    try:
        fd = os.open(hint_path(root), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENOENT: no daemon ever ran here; ENXIO: the FIFO has no reader, none runs now
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False  # never write into whatever else has the name
        with contextlib.suppress(BlockingIOError):  # full of unread hints: the daemon has enough of them
            os.write(fd, data)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def parse(data: bytes, limit: int = 8) -> list[str]:
    """The distinct non-empty hint lines in `data` (at most `limit`), in order; junk is dropped."""
    out: list[str] = []
    for raw in data.split(b"\n"):
        if not raw or len(raw) >= MAX_HINT:
            continue
        try:
            line = raw.decode("ascii")
        except UnicodeDecodeError:
            continue
        if line.isprintable() and line not in out:
            out.append(line)
            if len(out) == limit:
                break
    return out


class HintListener:
    """The daemon's end: calls `on_hint` (on its own thread) once for each batch of hints that arrives, with the
    batch's distinct image lines (empty hints give an empty list)."""

    def __init__(self, root: str | os.PathLike[str], on_hint: Callable[[list[str]], None]) -> None:
        self.path = hint_path(root)
        self.on_hint = on_hint
        self._fd = -1
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Create (or reuse) the FIFO and listen; False, with a warning, if that is not possible here."""
        try:
            try:
                st = os.lstat(self.path)
                if not stat.S_ISFIFO(st.st_mode):
                    os.unlink(self.path)  # not ours to read from: make the FIFO in its place
                    raise FileNotFoundError
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # another daemon on this root made it meanwhile
                    os.mkfifo(self.path, 0o600)
            # Read-write: with a writer of its own the FIFO never reads as end-of-file between clients.
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            self._wake = os.pipe()
        except OSError as exc:
            log.warning("pull hints are off: %s: %s", self.path, exc.strerror or exc)
            self._close_fds()
            return False
        self._thread = threading.Thread(target=self._listen, name="pull-hints", daemon=True)
        self._thread.start()
        return True

    def _listen(self) -> None:
        assert self._wake is not None
        fd, wake = self._fd, self._wake[0]
        while True:
            ready, _, _ = select.select([fd, wake], [], [])
            if wake in ready:
                return
            got = bytearray()
            try:
                while chunk := os.read(fd, 4096):  # drain: a burst of hints is one batch
                    got += chunk
            except BlockingIOError:
                pass
            except OSError as exc:
                log.warning("pull hints stopped: %s", exc)
                return
            try:
                self.on_hint(parse(bytes(got)))
            except Exception as exc:  # noqa: BLE001 - a hint is advisory; the listener goes on
                log.warning("pull hint not acted on: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        """Stop listening and remove the FIFO: clients then learn at once that nobody listens."""
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._fd, *(self._wake or ())):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd, self._wake = -1, None
