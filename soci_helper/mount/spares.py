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
    """At most one spare layer server at a time, for one store root, started on demand.

    `warm()` when mounts are likely soon (an image's first Prepare), `take()` for each mount: it hands over the
    current spare, if any, and starts the next one when more mounts are expected. A spare costs an interpreter's
    memory, so it goes after SPARE_IDLE_SEC without use, and none exists while nothing is being mounted: an idle
    daemon stays as small as it was.
    """

    def __init__(self, root: str | os.PathLike[str], idle_sec: float = SPARE_IDLE_SEC) -> None:
        self.root = os.path.abspath(root)
        self.idle_sec = idle_sec
        self._lock = threading.Lock()
        self._spare: Spare | None = None
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
        """Hold the lock. Push the idle deadline back and make sure a thread will retire an unused spare."""
        self._deadline = time.monotonic() + self.idle_sec
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(target=self._retire_idle, name="spare-reaper", daemon=True)
            self._reaper.start()

    def warm(self) -> None:
        """Have a spare ready (or starting) for a mount expected soon."""
        with self._lock:
            if self._closed:
                return
            if self._spare is None or self._spare.proc.poll() is not None:
                self._spare = self._start()
            self._arm()

    def take(self, more: bool = False) -> Spare | None:
        """The spare for a mount now (None if there is none); with `more`, start another for the next mount."""
        with self._lock:
            if self._closed:
                return None
            spare, self._spare = self._spare, None
            if spare is not None and spare.proc.poll() is not None:
                spare.release()
                spare = None
            if more:
                self._spare = self._start()
                self._arm()
            return spare

    def drop(self) -> None:
        """No mount is expected after all: stop the spare now rather than after the idle time."""
        spare = self.take()
        if spare is not None:
            spare.release()

    def _retire_idle(self) -> None:
        while True:
            with self._lock:
                if self._closed or self._spare is None:
                    self._reaper = None
                    return
                left = self._deadline - time.monotonic()
                if left <= 0:
                    spare, self._spare = self._spare, None
                    self._reaper = None
                    break
            time.sleep(min(left, 1.0))
        log.debug("retiring idle spare layer server %s", spare.mount_id)
        spare.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.release()
