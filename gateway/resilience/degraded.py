"""``Degradation``: whether the gateway runs degraded now, and why.

A dependency off the core path that falls behind (the store's writes, the span exporter's
queue, the summarizer's breaker, the event loop's lag) or an operator's hand puts the gateway
in degraded mode. The core path, forwarding and the hard limits, keeps working; optional work
stops: summarize compaction falls back to the next strategy that needs no model, content
capture and debug logging pause. Each reason is set and cleared on its own; the mode lasts
while any reason holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

REASONS: Final = ("manual", "store", "span_exporter", "summarizer", "loop_lag")
"""Every reason there is (a closed set: the metric's label)."""


@dataclass(frozen=True, slots=True)
class Reason:
    reason: str
    detail: str
    since: float
    actor: str
    """``system`` for the gateway's own detection, else the operator (admin token hash)."""


@dataclass(frozen=True, slots=True)
class Change:
    reason: str
    on: bool
    detail: str
    actor: str
    at: float


class Degradation:
    __slots__ = ("_on_change", "_reasons", "active")

    def __init__(self, on_change: Callable[[Change], None] | None = None) -> None:
        self._reasons: dict[str, Reason] = {}
        self._on_change = on_change
        self.active = False
        """Any reason holds: read on the request path, an attribute, not a call."""

    def set(self, reason: str, on: bool, detail: str = "", actor: str = "system") -> bool:
        """Set or clear one reason; True when that changed anything (then heard by
        ``on_change``: the audit log, the log, the metric)."""
        if reason not in REASONS:
            raise ValueError(f"unknown degradation reason {reason!r}")
        held = reason in self._reasons
        if held == on:
            return False
        now = time.time()
        if on:
            self._reasons[reason] = Reason(reason, detail, now, actor)
        else:
            del self._reasons[reason]
        self.active = bool(self._reasons)
        if self._on_change is not None:
            self._on_change(Change(reason, on, detail, actor, now))
        return True

    def holds(self, reason: str) -> bool:
        return reason in self._reasons

    def reasons(self) -> list[Reason]:
        return sorted(self._reasons.values(), key=lambda r: r.since)
