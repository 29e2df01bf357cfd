"""``Window``: counts over the last few seconds, for counters bumped on every call.

The breaker (calls and failures) and the retry budget (calls and retries) need how many of
each happened in the last N seconds, and add to their counters on every call. Counters only
grow; once a second, at the first call of that second, ``roll`` notes their values, and a
count within the window is the counter now minus its value at the window's start. The call
path pays an increment and one comparison (``now >= roll_at``), not a bucket lookup.
"""

from __future__ import annotations

from collections import deque

MARK_EVERY = 1.0
"""Seconds between two marks: the window's resolution."""


class Window:
    __slots__ = ("_marks", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._marks: deque[tuple[float, tuple[int, ...]]] = deque()

    def roll(self, now: float, *totals: int) -> float:
        """Note the counters' values now (before this call counts); returns when to next."""
        marks = self._marks
        marks.append((now, totals))
        start = now - self.seconds
        while marks[0][0] < start:
            marks.popleft()
        return now + MARK_EVERY

    def since(self, now: float, *totals: int) -> tuple[int, ...]:
        """How much each counter grew within the window ending ``now`` (to a second: calls
        in the second before the window's first mark are not counted)."""
        start = now - self.seconds
        for at, base in self._marks:
            if at >= start:
                return tuple(total - before for total, before in zip(totals, base, strict=True))
        return totals if not self._marks else tuple(0 for _ in totals)
