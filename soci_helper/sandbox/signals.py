"""Signals that unwind: the first Ctrl-C, SIGTERM or SIGHUP runs every cleanup; later ones cannot cut it short."""

from __future__ import annotations

import signal
import sys
from types import FrameType


class UnwindOnSignal:
    """Install once at the start of a command that owns sandboxes (registries, containerd, mounts, netns).

    Without it SIGTERM kills Python outright and no `finally` runs, leaving daemons and mounts behind.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.seen = 0

    def install(self) -> UnwindOnSignal:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.seen += 1
        if self.seen == 1:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        print(f"{self.prog}: cleaning up, please wait", file=sys.stderr, flush=True)
