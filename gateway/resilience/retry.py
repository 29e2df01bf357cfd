"""When a failed upstream call is tried again, and how long to wait: as the official OpenAI
and Anthropic SDKs decide, within a budget per upstream.

A call is retried only before anything reached the client: on a connection error or reset
before the response headers, or on 408, 429, 500, 502, 503, 504 and Anthropic's 529. Never on
another 4xx, never once a response has begun.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Final

from gateway.resilience.window import Window

RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 529})
UNWELL_STATUSES: Final = frozenset({500, 502, 503, 504, 529})
"""Answers that say the upstream itself is unwell (the breaker counts them; 408 and 429 are
retried but say nothing about its health)."""
OVERLOAD_STATUSES: Final = frozenset({503, 529})
"""Answers that say "too much": the adaptive limit shrinks on them (and on timeouts)."""
BUDGET_WINDOW: Final = 10
"""Seconds of recent requests a retry budget looks at."""
RESERVE: Final = 0.1
"""Retries a second a budget allows beyond its ratio (one in its window)."""
RETRY_AFTER_MAX: Final = 60.0
"""The longest ``Retry-After`` waited out (the SDKs wait at most 60 s); a longer one is the
upstream's answer to pass on, not to hold a slot for."""


def should_retry(headers: Mapping[str, str]) -> bool | None:
    """The upstream's own word (``x-should-retry``, which both SDKs obey), if it gave one."""
    value = headers.get("x-should-retry")
    if value == "true":
        return True
    if value == "false":
        return False
    return None


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
            if when.tzinfo is None:
                return None
            seconds = when.timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        return max(0.0, seconds)
    return seconds if 0 <= seconds < 1e9 else None


class RetryBudget:
    """Retries may add at most ``ratio`` of the requests of the last ``BUDGET_WINDOW``
    seconds (Finagle's retry budget), plus ``reserve`` a second so a quiet gateway can still
    retry (one in the window by default): the upstream sees at most ``1 + ratio`` times the
    clients' calls, and one retry more every ten seconds."""

    __slots__ = ("_clock", "_requests", "_retries", "_roll_at", "_window", "ratio", "reserve")

    def __init__(
        self, ratio: float, reserve: float = RESERVE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self._clock = clock
        self._requests = self._retries = 0
        self._window = Window(BUDGET_WINDOW)
        self._roll_at = -math.inf

    def request(self, now: float | None = None) -> None:
        """A client's call went upstream (its first attempt); ``now`` as ``Breaker.success``."""
        if now is None:
            now = self._clock()
        if now >= self._roll_at:  # once a second
            self._roll_at = self._window.roll(now, self._requests, self._retries)
        self._requests += 1

    def try_spend(self) -> bool:
        """May one more retry go? If so, it is counted."""
        now = self._clock()
        if now >= self._roll_at:
            self._roll_at = self._window.roll(now, self._requests, self._retries)
        requests, retries = self._window.since(now, self._requests, self._retries)
        if retries >= self.ratio * requests + self.reserve * BUDGET_WINDOW:
            return False
        self._retries += 1
        return True
