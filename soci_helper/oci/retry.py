"""Retry policy for registry requests: which failures are retried and how long to back off."""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

# Statuses that mean "try again later"; 501 and 505 are permanent, 4xx other than 408/429 too.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# The most we wait on a server's Retry-After, whatever our own back-off cap is.
RETRY_AFTER_CAP = 120.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with full jitter, capped; defaults are upstream's [http] values."""

    max_retries: int = 8
    min_wait: float = 0.030
    max_wait: float = 300.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based).

        A server's Retry-After wins over our own schedule (it knows its load),
        but is still capped so a hostile value cannot hang us.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), max(self.max_wait, RETRY_AFTER_CAP))
        base = min(self.min_wait * (2 ** attempt), self.max_wait)
        # Jitter in [base/2, base]: spreads clients apart but keeps the growth.
        return base / 2 + random.random() * base / 2


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent or bad."""
    if not value:
        return None
    v = value.strip()
    if v.isdigit():
        return float(v)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
