"""``gateway_event_loop_lag_seconds``: how late the event loop runs a timer, sampled by a task
the app starts in a cleanup context (``app._loop_lag``)."""

from __future__ import annotations

import asyncio

from gateway.telemetry.metrics import Metrics

LAG_INTERVAL = 0.5
"""Seconds between samples (the family's help text says so)."""


async def watch_loop_lag(metrics: Metrics) -> None:
    """Sleep ``LAG_INTERVAL`` again and again and record how late each wake-up came."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + LAG_INTERVAL
        await asyncio.sleep(LAG_INTERVAL)
        metrics.loop_lag.observe((), max(0.0, loop.time() - asked))
