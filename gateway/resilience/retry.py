"""When a failed upstream call is tried again, and how long to wait: as the official OpenAI
and Anthropic SDKs decide, within a budget per upstream.

A call is retried only before anything reached the client: on a connection error or reset
before the response headers, or on 408, 429, 500, 502, 503, 504 and Anthropic's 529. Never on
another 4xx, never once a response has begun.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from typing import Final

RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 529})
UNWELL_STATUSES: Final = frozenset({500, 502, 503, 504, 529})
"""Answers that say the upstream itself is unwell (the breaker counts them; 408 and 429 are
retried but say nothing about its health)."""
OVERLOAD_STATUSES: Final = frozenset({503, 529})
"""Answers that say "too much": the adaptive limit shrinks on them (and on timeouts)."""
BUDGET_WINDOW: Final = 10
"""Seconds of recent requests a retry budget looks at."""


def backoff(retry: int, base: float, cap: float) -> float:
    """Full jitter (AWS's "exponential backoff and jitter"): the n-th retry waits a uniform
    random time up to ``base * 2**(n-1)``, at most ``cap``, so clients that failed together do
    not come back together."""
    return random.uniform(0.0, min(cap, base * 2 ** (retry - 1)))


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the upstream asked for: ``retry-after-ms`` (OpenAI, Anthropic), else
    ``Retry-After`` as seconds or an HTTP date. None when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if 0 <= ms < 1e9:
            return ms / 1000
    value = headers.get("retry-after")
    if value is None or len(value) > 64:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if 0 <= seconds < 1e9 else None


class RetryBudget:
    """Retries may add at most ``ratio`` of the requests of the last ``BUDGET_WINDOW``
    seconds (Finagle's retry budget), plus ``reserve`` a second so a quiet gateway can still
    retry: during an outage the upstream sees at most ``1 + ratio`` times the clients' calls."""

    __slots__ = ("_clock", "_requests", "_retries", "_stamps", "ratio", "reserve")

    def __init__(
        self, ratio: float, reserve: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._clock = clock
        self._stamps = [-1] * BUDGET_WINDOW
        self._requests = [0] * BUDGET_WINDOW
        self._retries = [0] * BUDGET_WINDOW

    def request(self, now: float | None = None) -> None:
        """A client's call went upstream (its first attempt); ``now`` as ``Breaker.success``."""
        self._requests[self._bucket(now)] += 1

    def try_spend(self) -> bool:
        """May one more retry go? If so, it is counted."""
        oldest = int(self._clock()) - BUDGET_WINDOW
        requests = retries = 0
        for i, stamp in enumerate(self._stamps):
            if stamp > oldest:
                requests += self._requests[i]
                retries += self._retries[i]
        if retries >= self.ratio * requests + self.reserve * BUDGET_WINDOW:
            return False
        self._retries[self._bucket()] += 1
        return True

    def _bucket(self, now: float | None = None) -> int:
        second = int(self._clock() if now is None else now)
        i = second % BUDGET_WINDOW
        if self._stamps[i] != second:
            self._stamps[i] = second
            self._requests[i] = self._retries[i] = 0
        return i
