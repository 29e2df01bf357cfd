"""``gateway_event_loop_lag_seconds``: how late the event loop runs a timer, sampled by a task
the app starts in a cleanup context (``app._loop_lag``); and ``LagWatch``, which puts the
gateway in degraded mode (``loop_lag``) while the lag stays past its bound."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from gateway.resilience.degraded import Degradation

LAG_INTERVAL = 0.5
"""Seconds between samples (the family's help text says so)."""
ENTER_SAMPLES = 2
"""Samples in a row past the bound that enter degraded mode: one long pause (a slow garbage
collection, a swap-in) is not yet a loop that falls behind."""
LEAVE_SAMPLES = 10
"""Samples in a row under half the bound that leave it (5 s): a loop near its bound would
otherwise flap in and out, and every change is a log line and an audit entry."""


class LagWatch:
    """Hysteresis over the lag samples: degraded for ``loop_lag`` after ``ENTER_SAMPLES`` past
    ``bound``, cleared after ``LEAVE_SAMPLES`` under half of it."""

    __slots__ = ("_over", "_under", "bound", "degraded")

    def __init__(self, degraded: Degradation, bound: float) -> None:
        self.degraded = degraded
        self.bound = bound
        self._over = 0
        self._under = 0

    def sample(self, lag: float) -> None:
        """One sample, in seconds (the task's, or a test's)."""
        if lag > self.bound:
            self._over += 1
            self._under = 0
            if self._over >= ENTER_SAMPLES:
                detail = f"event loop {lag:.2f}s late ({self._over} samples past {self.bound:g}s)"
                self.degraded.set("loop_lag", True, detail)
        elif lag < self.bound / 2:
            self._over = 0
            self._under += 1
            if self._under >= LEAVE_SAMPLES:
                self.degraded.set("loop_lag", False, f"event loop {lag:.3f}s late")
        else:
            self._over = self._under = 0  # between the two: neither enters nor leaves


async def watch_loop_lag(metrics: Metrics, watch: LagWatch | None = None) -> None:
    """Sleep ``LAG_INTERVAL`` again and again and record how late each wake-up came."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + LAG_INTERVAL
        await asyncio.sleep(LAG_INTERVAL)
        lag = max(0.0, loop.time() - asked)
        metrics.loop_lag.observe((), lag)
        if watch is not None:
            watch.sample(lag)
