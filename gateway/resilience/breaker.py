"""``Breaker``: one per upstream (and one for the summarizer's calls).

Closed, it counts failures of the kinds that say the upstream itself is unwell (5xx, 529,
timeouts, resets; never a 429, which in passthrough is one key's own rate limit, nor another
4xx). Past ``failures`` in a row, or ``failure_ratio`` of the calls in the last ``window``
seconds, it opens: calls are answered at once without an upstream attempt. After ``open``
seconds one probe goes through (half-open): a success closes it, a failure opens it again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.resilience.window import Window
from gateway.settings import BreakerSettings

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
STATES: Final = (CLOSED, HALF_OPEN, OPEN)


@dataclass(frozen=True, slots=True)
class Transition:
    breaker: str
    old: str
    new: str
    reason: str
    """What moved it: ``5 consecutive failures (http_503)``, ``probe succeeded``, ..."""
    at: float


class Breaker:
    __slots__ = (
        "_calls",
        "_clock",
        "_failures",
        "_on_change",
        "_probing",
        "_roll_at",
        "_window",
        "consecutive",
        "name",
        "opened_at",
        "settings",
        "state",
    )

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        on_change: Callable[[Transition], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings
        self.state: str = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self._probing = False
        self._on_change = on_change
        self._clock = clock
        # Calls and failures ever, and their values once a second (``window``).
        self._calls = self._failures = 0
        self._window = Window(settings.window)
        self._roll_at = -math.inf

    def allow(self) -> bool:
        """May a call go upstream now? Closed: yes. Open: no, until ``open`` seconds have
        passed; then one probe (half-open), and no other call until its answer."""
        if self.state == CLOSED or not self.settings.enabled:
            return True
        if self.state == OPEN:
            if self._clock() - self.opened_at < self.settings.open:
                return False
            self._move(HALF_OPEN, f"open for {self.settings.open:g}s: one probe")
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_after(self) -> float:
        """Seconds until a probe may go (at least one)."""
        if self.state != OPEN:
            return 1.0
        return max(1.0, self.settings.open - (self._clock() - self.opened_at))

    def success(self, now: float | None = None) -> None:
        """The upstream answered (any status but a failure's, 429 and 4xx included).
        ``now``: the caller's monotonic clock reading, if it has one (saves reading it)."""
        self.consecutive = 0
        if now is None:
            now = self._clock()
        if now >= self._roll_at:  # once a second
            self._roll_at = self._window.roll(now, self._calls, self._failures)
        self._calls += 1
        if self.state is HALF_OPEN:
            self._probing = False
            self._move(CLOSED, "probe succeeded")

    def failure(self, reason: str, now: float | None = None) -> None:
        self.consecutive += 1
        if now is None:
            now = self._clock()
        if now >= self._roll_at:
            self._roll_at = self._window.roll(now, self._calls, self._failures)
        self._calls += 1
        self._failures += 1
        if self.state is HALF_OPEN:
            self._probing = False
            self._open(f"probe failed ({reason})")
        elif self.state is CLOSED and self.settings.enabled:
            settings = self.settings
            if self.consecutive >= settings.failures:
                self._open(f"{self.consecutive} consecutive failures ({reason})")
                return
            calls, failures = self._window.since(now, self._calls, self._failures)
            if calls >= settings.min_calls and failures >= settings.failure_ratio * calls:
                self._open(f"{failures} of {calls} calls failed in {settings.window:g}s ({reason})")

    def abandoned(self) -> None:
        """A call that went through ended without a verdict (its client left): a probe that
        did not tell lets the next call probe."""
        if self.state == HALF_OPEN:
            self._probing = False

    def force(self, state: str, reason: str) -> None:
        """An operator's hand (or a test's): open or close it now."""
        if state not in STATES:
            raise ValueError(f"a breaker is {', '.join(STATES)}, not {state!r}")
        state = STATES[STATES.index(state)]  # the constant itself: states are compared by `is`
        if state == OPEN:
            self._open(reason)
        else:
            self.consecutive = 0
            self._probing = False
            self._move(state, reason)

    def _open(self, reason: str) -> None:
        self.opened_at = self._clock()
        self._move(OPEN, reason)

    def _move(self, new: str, reason: str) -> None:
        old, self.state = self.state, new
        if old != new and self._on_change is not None:
            self._on_change(Transition(self.name, old, new, reason, time.time()))
