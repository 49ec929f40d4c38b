"""Spare layer servers: interpreters started and imported ahead of the mounts a long-lived caller will ask for."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..fs import server as srv

log = logging.getLogger(__name__)

# A spare nobody asked for this long after the last request goes: it is an interpreter's worth of memory.
SPARE_IDLE_SEC = 30.0
# Spares for the lazy layers of one image, started together once its index is known: each is an interpreter
# starting on two cores, so a few at most.
MAX_SPARES = 3


@dataclass(slots=True)
class Spare:
    mount_id: str
    proc: subprocess.Popen[bytes]
    log_file: Path
    used: bool = False
    released: bool = False

    def hand_over(self, argv: list[str]) -> int | None:
        """Send the server its arguments; returns the fd its answer will come on, None if the spare is gone.

        The caller owns the returned fd and must reap the spare (it exits once the server has detached)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(json.dumps(argv).encode() + b"\n")
            self.proc.stdin.close()
        except OSError:  # it died (an import failed, or it was killed): the caller starts a server itself
            self.release()
            return None
        self.used = True
        return self.proc.stdout.fileno()

    def release(self) -> None:
        """Done with it (idempotent): reap a spare that was handed a mount, stop one that was not."""
        if self.released:
            return
        self.released = True
        if self.used:
            self._reap()
        else:
            self._discard()

    def _reap(self) -> None:
        # After hand_over it exits once its server has detached (or at once, failing).
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # stuck before it could fork: the caller stops what it started
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def _discard(self) -> None:
        # Unused, it holds nothing: stop it at once rather than wait for its imports to end and its log,
        # still empty, goes too.
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(OSError):
            self.proc.kill()
        self._reap()
        with contextlib.suppress(OSError):
            if self.log_file.stat().st_size == 0:
                self.log_file.unlink()


class SparePool:
    """Spare layer servers for one store root, started on demand: at most MAX_SPARES at a time.

    `warm(n)` when mounts are likely soon (a pull begins: one; its index shows n lazy layers: n), `take()` for
    each mount: it hands over a spare, if any, and starts the next one when more mounts are expected and none
    is left. A spare costs an interpreter's memory, so spares go after SPARE_IDLE_SEC without use, and none
    exists while nothing is being mounted: an idle daemon stays as small as it was.
    """

    def __init__(self, root: str | os.PathLike[str], idle_sec: float = SPARE_IDLE_SEC) -> None:
        self.root = os.path.abspath(root)
        self.idle_sec = idle_sec
        self._lock = threading.Lock()
        self._spares: list[Spare] = []
        self._deadline = 0.0
        self._closed = False
        self._reaper: threading.Thread | None = None

    def _start(self) -> Spare | None:
        mount_id = os.urandom(6).hex()
        mdir = srv.mounts_dir(self.root)
        log_file = srv.log_path(self.root, mount_id)
        try:
            mdir.mkdir(parents=True, exist_ok=True)
            with open(log_file, "ab") as logf:
                proc = subprocess.Popen([sys.executable, "-m", srv.MODULE, *srv.spare_argv(self.root, mount_id)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf,
                                        close_fds=True, cwd="/")
        except OSError as exc:
            log.warning("could not start a spare layer server: %s", exc)
            return None
        return Spare(mount_id, proc, log_file)

    def _arm(self) -> None:
        """Hold the lock. Push the idle deadline back and make sure a thread will retire unused spares."""
        self._deadline = time.monotonic() + self.idle_sec
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._retire_idle, name="spare-reaper", daemon=True)
            self._reaper.start()

    def _live(self) -> list[Spare]:
        """Hold the lock. Forget spares that died; they are returned for the caller to release."""
        dead = [s for s in self._spares if s.proc.poll() is not None]
        self._spares = [s for s in self._spares if s not in dead]
        return dead

    def warm(self, n: int = 1) -> None:
        """Have `n` spares (at most MAX_SPARES) ready or starting for mounts expected soon."""
        with self._lock:
            if self._closed:
                return
            dead = self._live()
            while len(self._spares) < min(n, MAX_SPARES):
                spare = self._start()
                if spare is None:
                    break
                self._spares.append(spare)
            self._arm()
        for spare in dead:
            spare.release()

    def take(self, more: bool = False) -> Spare | None:
        """A spare for a mount now (None if there is none); with `more`, start another for the next mount if
        none is left."""
        with self._lock:
            if self._closed:
                return None
            dead = self._live()
            spare = self._spares.pop(0) if self._spares else None
            if more:
                if not self._spares:
                    nxt = self._start()
                    if nxt is not None:
                        self._spares.append(nxt)
                self._arm()
        for d in dead:
            d.release()
        return spare

    def drop(self) -> None:
        """No mount is expected after all: stop the spares now rather than after the idle time."""
        with self._lock:
            spares, self._spares = self._spares, []
        for spare in spares:
            spare.release()

    def _retire_idle(self) -> None:
        while True:
            with self._lock:
                if self._closed or not self._spares:
                    self._reaper = None
                    return
                left = self._deadline - time.monotonic()
                if left <= 0:
                    spares, self._spares = self._spares, []
                    self._reaper = None
                    break
            time.sleep(min(left, 1.0))
        for spare in spares:
            log.debug("retiring idle spare layer server %s", spare.mount_id)
            spare.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares, self._spares = self._spares, []
        for spare in spares:
            spare.release()
