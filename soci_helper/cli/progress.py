"""Terminal progress bars for long work; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One updating line on a terminal: label, bar, bytes done and rate. No output off a tty."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self.min_interval = min_interval

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval and done < self.total:
            return
        self._last = now
        frac = min(done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width)
        rate = done / max(now - self.start, 1e-6) / 1e6
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {frac * 100:5.1f}% {done / 1e6:8.1f} MB {rate:7.1f} MB/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
