"""Background fetch of the remaining spans of mounted layers, once their readers go quiet."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..config import BackgroundFetchConfig
from ..errors import SociError

if TYPE_CHECKING:
    from .spans import SpanManager

log = logging.getLogger(__name__)

# A failed pass (registry away) is retried this many times, then the fetcher gives up until restarted.
_MAX_PASSES = 3


class BackgroundFetcher:
    """One thread filling the span cache for some mounts, at most one span per fetch_period_msec.

    It waits until no registered mount saw a foreground read for silence_period_msec, and checks
    again before every span, so foreground reads take over the network within one span's fetch.
    It stops once every span of every mount is cached (or after a few failed passes).
    """

    def __init__(self, config: BackgroundFetchConfig | None = None) -> None:
        self.config = config or BackgroundFetchConfig()
        self.silence = self.config.silence_period_msec / 1000.0
        self.period = self.config.fetch_period_msec / 1000.0
        self._managers: list[SpanManager] = []
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.spans_fetched = 0
        self.done = threading.Event()

    def add(self, manager: SpanManager) -> None:
        with self._mu:
            self._managers.append(manager)

    def start(self) -> None:
        if self.config.disable or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="soci-background-fetch", daemon=True)
        self._thread.start()

    def stop(self, wait: float = 5.0) -> None:
        self._stop.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(wait)

    def _quiet_for(self) -> float:
        """Seconds still to wait before the silence period has passed for every mount (0 if it has)."""
        with self._mu:
            last = max((m.last_activity for m in self._managers), default=0.0)
        return max(0.0, last + self.silence - time.monotonic())

    def _wait_quiet(self) -> bool:
        while not self._stop.is_set():
            left = self._quiet_for()
            if left <= 0:
                return True
            self._stop.wait(left)
        return False

    def _run(self) -> None:
        try:
            for _ in range(_MAX_PASSES):
                if not self._pass():
                    return
                with self._mu:
                    managers = list(self._managers)
                missing = sum(1 for m in managers if not m.closed for s in range(m.num_spans) if not m.is_cached(s))
                if not missing:
                    log.info("background fetch: all spans of %d layer(s) cached", len(managers))
                    return
                if self._stop.wait(max(self.silence, 1.0)):
                    return
            log.warning("background fetch: giving up with spans still missing after %d passes", _MAX_PASSES)
        finally:
            self.done.set()

    def _pass(self) -> bool:
        """One sweep over every mount's spans; False if stopped."""
        with self._mu:
            managers = list(self._managers)
        for m in managers:
            for sid in range(m.num_spans):
                if m.closed:
                    break
                if not self._wait_quiet():
                    return False
                if m.is_cached(sid):
                    continue
                try:
                    fetched = m.fetch_span(sid)
                except SociError as exc:
                    log.warning("background fetch: %s span %d: %s", m.layer, sid, exc)
                    fetched = True  # still pace the next attempt
                if fetched:
                    self.spans_fetched += 1
                    if self._stop.wait(self.period):
                        return False
        return True
